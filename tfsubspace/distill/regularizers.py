"""Group LASSO for one weight tensor: a Keras regularizer over output filters (GroupLasso,
serializable with .keras models) and its proximal operator (soft_threshold_groups). For
element-wise L1 use keras.regularizers.L1; the compression trainer's penalty over whole
channels of a model is tfsubspace.distill.lasso.ChannelLasso.
"""

from __future__ import annotations

import keras
from keras import ops


def _check_factor(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != value:
        raise ValueError(f"{name} must be a non-negative float. Received: {name}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="tfsubspace")
class GroupLasso(keras.regularizers.Regularizer):
    """Group LASSO over output filters: `loss = factor * sum_j sqrt(sum_i x[..., i, j]^2)`.

    Each slice along the last axis (one output filter of a Conv kernel, one output unit of
    a Dense kernel, one entry of a BatchNormalization gamma) is a group, so the penalty drives
    whole filters to zero rather than single weights.

    Example:
        keras.layers.Conv2D(16, 3, kernel_regularizer=tfsubspace.distill.regularizers.GroupLasso(1e-3))

    Args:
        factor: the penalty factor (non-negative float).
        epsilon: added under the square root, so the gradient exists at zero.
    """

    def __init__(self, factor: float = 0.01, epsilon: float = 1e-12):
        self.factor = _check_factor("factor", factor)
        self.epsilon = _check_factor("epsilon", epsilon)

    def __call__(self, x):
        x = ops.reshape(x, (-1, ops.shape(x)[-1]))
        return self.factor * ops.sum(ops.sqrt(ops.sum(ops.square(x), axis=0) + self.epsilon))

    def get_config(self):
        return {"factor": self.factor, "epsilon": self.epsilon}


def soft_threshold_groups(x, threshold):
    """The proximal operator of group LASSO over the last axis: each slice v becomes
    v * max(0, 1 - threshold / ||v||), so slices with norm <= threshold become exact zeros."""
    flat = ops.reshape(x, (-1, ops.shape(x)[-1]))
    norms = ops.sqrt(ops.sum(ops.square(flat), axis=0))
    scale = ops.maximum(0.0, 1.0 - threshold / ops.maximum(norms, 1e-30))
    return x * scale
