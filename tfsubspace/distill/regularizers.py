"""LASSO penalties: element-wise L1, group LASSO over output filters, and channel-group LASSO.

`L1` and `GroupLasso` are Keras regularizers for one weight tensor (kernel_regularizer=...),
serializable with .keras models. `ChannelLasso` is the penalty the compression trainer uses:
one group norm per prunable channel of the model (tfsubspace.prune.analysis), gathered over every
layer that produces that channel, taken relative to its group (scale-invariant), with a
proximal soft-threshold step that sets whole channels to exact zeros.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfsubspace.prune import channels
from tfsubspace.prune.analysis import ChannelAnalysis


def _check_factor(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != value:
        raise ValueError(f"{name} must be a non-negative float. Received: {name}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="tfsubspace")
class L1(keras.regularizers.Regularizer):
    """Element-wise LASSO: `loss = l1 * reduce_sum(abs(x))`.

    Example:
        keras.layers.Conv2D(16, 3, kernel_regularizer=tfsubspace.distill.regularizers.L1(1e-4))

    Args:
        l1: the penalty factor (non-negative float).
    """

    def __init__(self, l1: float = 0.01):
        self.l1 = _check_factor("l1", l1)

    def __call__(self, x):
        return self.l1 * ops.sum(ops.abs(x))

    def get_config(self):
        return {"l1": self.l1}


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


class ChannelLasso:
    """Scale-invariant group LASSO over the prunable channels of a model.

    For each channel of each prunable channel group, its *members* are, for every layer
    that produces it: the gamma and beta entries if a BatchNormalization directly follows
    that layer (the kernel's scale is then free, so the BN measures the channel; with beta
    in the group a zeroed channel outputs act(0), which is 0 for ReLU and the like, so that
    removing it changes nothing), else the layer's output filter (kernel slice and bias).
    The channel's norm is the L2 norm of all its members together.

    Norms are taken relative to their group's mean norm. A plain penalty on gammas fails
    in BN networks: scaling every gamma (and beta) of a layer alike leaves the next
    BatchNormalization's output unchanged, so the penalty can fall with no change to the
    function, every gamma shrinks alike, and no channel reaches zero before the BN epsilon
    breaks the network. Relative to the group's mean, only the channels' shares count.

    - `penalty()`: sum over channels of norm / (its group's root-mean-square norm): an L1/L2
      ratio, unchanged by scaling a group and smallest when few channels carry the group.
    - `proximal(threshold)`: soft-thresholds each channel's members jointly by
      threshold * (its group's mean norm), so that channels that fall behind their group
      become exact zeros. The strongest channel of each group is never thresholded, so no
      group (and no layer) dies whole and gradients keep flowing. In a group measured by BN
      parameters alone (scale-free), the group's mean norm is then restored, so its scale
      does not drift; elsewhere the scale matters to the function and the loss holds it
      (call after each optimizer step).
    - `norms()`: the channel norms per group, as numpy arrays (for pruning decisions).
    - `set_targets(masks)`: thresholds only the marked channels (BudgetTargets marks the
      ones a parameter budget would remove, so that they, and only they, reach zero).
    A channel whose activation of zero is not zero carries a constant once zeroed, which
    surgery folds into the next layer (apply_plan(..., fold_constants=True)).
    """

    def __init__(self, analysis: ChannelAnalysis, epsilon: float = 1e-12):
        self.analysis = analysis
        self.epsilon = epsilon
        index = ChannelIndex(analysis)
        self.index = index
        self.group_sizes = index.group_sizes
        self.num_channels = index.num_channels
        self._group_of_channel = index.group_of_channel
        self._group_sizes = np.array(list(self.group_sizes.values()), dtype=np.float32)
        # members: (variable, channel index of each slice along its last axis)
        self.members: list[tuple[keras.Variable, np.ndarray]] = []
        scale_free = np.ones(len(self._group_sizes), dtype=bool)  # per group: measured by BNs only
        for node, bn, channel_index in index.producers():
            if bn is not None and bn.scale:
                self.members.append((bn.gamma, channel_index))
                if bn.center:
                    self.members.append((bn.beta, channel_index))
            else:
                self.members.append((_kernel(node.layer), channel_index))
                if node.layer.use_bias:
                    self.members.append((node.layer.bias, channel_index))
                scale_free[self._group_of_channel[channel_index]] = False
        self._scale_free = scale_free[self._group_of_channel]  # per channel
        # per channel: 1 where the proximal step applies, 0 where it does not (see set_targets)
        self.targets = keras.Variable(np.ones(self.num_channels, "float32"), trainable=False, name="lasso_targets")

    def set_targets(self, masks: dict[str, np.ndarray] | None) -> None:
        """Restricts the proximal step to the channels marked True per prunable group (None:
        all; groups not given, or not prunable, are left alone)."""
        if masks is None:
            self.targets.assign(np.ones(self.num_channels, "float32"))
            return
        flat = np.zeros(self.num_channels, "float32")
        for name, mask in masks.items():
            if name not in self.index.offsets:
                continue
            o = self.index.offsets[name]
            flat[o:o + self.group_sizes[name]] = np.asarray(mask, "float32")
        self.targets.assign(flat)

    def _norms(self):
        parts, segments = [], []
        for var, index in self.members:
            flat = ops.reshape(var, (-1, ops.shape(var)[-1]))
            parts.append(ops.sum(ops.square(flat), axis=0))
            segments.append(index)
        squared = ops.segment_sum(ops.concatenate(parts), ops.convert_to_tensor(np.concatenate(segments)),
                                  num_segments=self.num_channels)
        return ops.sqrt(squared + self.epsilon)

    def _group_mean(self, norms):
        """Each channel's group mean of `norms`."""
        groups = ops.convert_to_tensor(self._group_of_channel)
        sums = ops.segment_sum(norms, groups, num_segments=len(self._group_sizes))
        return ops.take(sums / ops.convert_to_tensor(self._group_sizes), groups)

    def _group_max(self, norms):
        """Each channel's group maximum of `norms`."""
        groups = ops.convert_to_tensor(self._group_of_channel)
        return ops.take(ops.segment_max(norms, groups, num_segments=len(self._group_sizes)), groups)

    def penalty(self):
        """Sum over channels of the channel's norm relative to its group's RMS norm."""
        norms = self._norms()
        return ops.sum(norms / ops.sqrt(self._group_mean(ops.square(norms))))

    def proximal(self, threshold) -> None:
        """Soft-thresholds every channel by threshold * its group's mean norm (in place), then
        restores each group's mean norm."""
        norms = self._norms()
        mean = self._group_mean(norms)
        shrink = ops.maximum(0.0, 1.0 - threshold * self.targets * mean / ops.maximum(norms, 1e-30))
        shrink = ops.where(norms >= self._group_max(norms), 1.0, shrink)  # the strongest survives
        restore = mean / ops.maximum(self._group_mean(norms * shrink), 1e-30)
        factor = shrink * ops.where(ops.convert_to_tensor(self._scale_free), restore, 1.0)
        for var, index in self.members:
            var.assign(var * ops.take(factor, ops.convert_to_tensor(index)))

    def norms(self) -> dict[str, np.ndarray]:
        """The current channel norms, per prunable group (exact zeros included)."""
        norms = keras.ops.convert_to_numpy(ops.sqrt(ops.maximum(ops.square(self._norms()) - self.epsilon, 0.0)))
        return self.index.split(norms)


class BatchNormL1:
    """Network Slimming's sparsity term (Liu et al., ICCV 2017): `loss = sum |gamma|` over the
    BatchNormalization layers of the prunable channels.

    The same interface as ChannelLasso (`members`, `penalty()`, `proximal()`, `norms()`), so
    StudentTrainer trains with either. Liu et al. add the penalty's subgradient to the loss
    (StudentTrainer(..., proximal=False)); `proximal(threshold)` is the plain soft-threshold
    of every gamma. `norms()` gives |gamma| per channel (the mean over the channel's BNs),
    the score Network Slimming prunes by with one global threshold.
    """

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.index = ChannelIndex(analysis)
        self.members: list[tuple[keras.Variable, np.ndarray]] = []
        for node in analysis.graph.walk():
            if isinstance(node.layer, keras.layers.BatchNormalization) and node.layer.scale:
                channel_index = self.index.of(analysis.ids[node.outputs[0].key])
                if channel_index is not None:
                    self.members.append((node.layer.gamma, channel_index))
        if not self.members:
            raise ValueError(f"Model {analysis.model.name!r} has no BatchNormalization on a prunable channel: "
                             "Network Slimming needs BN scales to rank channels.")

    def penalty(self):
        return sum(ops.sum(ops.abs(var)) for var, _ in self.members)

    def proximal(self, threshold) -> None:
        for var, _ in self.members:
            var.assign(ops.sign(var) * ops.maximum(ops.abs(var) - threshold, 0.0))

    def norms(self) -> dict[str, np.ndarray]:
        total = np.zeros(self.index.num_channels)
        count = np.zeros(self.index.num_channels)
        for var, channel_index in self.members:
            np.add.at(total, channel_index, np.abs(keras.ops.convert_to_numpy(var)))
            np.add.at(count, channel_index, 1)
        return self.index.split(total / np.maximum(count, 1))


class ChannelIndex:
    """Numbers the prunable channels of a model 0..num_channels-1, group after group, and finds
    the layers that produce them."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.offsets: dict[str, int] = {}
        self.group_sizes: dict[str, int] = {}
        group_of_channel = []
        for g in analysis.groups.values():
            if g.prunable:
                self.offsets[g.name] = len(group_of_channel)
                self.group_sizes[g.name] = g.size
                group_of_channel += [len(self.offsets) - 1] * g.size
        self.num_channels = len(group_of_channel)
        self.group_of_channel = np.array(group_of_channel, dtype=np.int32)

    def of(self, ids: np.ndarray) -> np.ndarray | None:
        """The flat index of each channel id, or None if any is not prunable."""
        out = np.empty(len(ids), dtype=np.int32)
        for p, c in enumerate(ids.tolist()):
            pos = self.analysis.channel_position(c)
            if pos is None or pos[0] not in self.offsets:
                return None
            out[p] = self.offsets[pos[0]] + pos[1]
        return out

    def split(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Per-channel values cut into their groups."""
        return {name: values[o:o + self.group_sizes[name]] for name, o in self.offsets.items()}

    def producers(self):
        """(node, the BatchNormalization that alone reads its output or None, flat channel index)
        for every layer that produces prunable channels."""
        consumers = self.analysis.consumers()
        for node in self.analysis.graph.walk():
            if not isinstance(channels.handler_for(node.layer), channels.Producer):
                continue
            channel_index = self.of(self.analysis.ids[node.outputs[0].key])
            if channel_index is not None:
                yield node, _following_batchnorm(node, consumers), channel_index


def _kernel(layer):
    """The weight whose last axis is the layer's output channels."""
    return layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel


def _following_batchnorm(node, consumers):
    """The BatchNormalization that alone consumes `node`'s output, if any."""
    readers = consumers.get(node.outputs[0].key, [])
    if len(readers) == 1 and isinstance(readers[0].layer, keras.layers.BatchNormalization):
        return readers[0].layer
    return None
