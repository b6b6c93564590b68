"""The int8 range of a classifier's logits, narrowed to where its top classes fall (an int8 fix).

A full-int8 file gives its output tensor one scale, set by the most extreme logits of the
calibration images: on the MobileNetV2 test model (benchmarks/int8.py) the logits span -20 to
40, one int8 step is 0.24, and two classes closer than that on an unsure image round to the
same value (the file's top-1 is then the lower class index). Only the top classes of each
image decide its top-1 and its softmax probabilities, so `narrow_output` clips the model's
logits to [min top-1 - MARGIN, max top-2 + MARGIN] over the calibration images (a
ClipOutput layer, MINIMUM and MAXIMUM ops in the file; the converter calibrates the last layer
to that range). On an image like the calibration ones this keeps the top-1, and the softmax
probabilities move by at most about (classes - 1) * exp(-MARGIN) (4e-4 for 10 classes): a
logit cut at the bottom stays at least MARGIN under the top one, and a top logit cut at the
top stays at least MARGIN over the second. The logits themselves change where they are cut
(the step reports the largest change). A model whose outputs are probabilities (a softmax:
their int8 range is fixed at [0, 1]), or that has no (batch, classes) output, is left alone.
"""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.edge.graphedit import predict

MARGIN = 10.0  # logits: exp(-10) = 4.5e-5 of the top class's probability


@keras.saving.register_keras_serializable(package="tfsubspace")
class ClipOutput(keras.layers.Layer):
    """Clips its input to [low, high] (the logits' int8 range, see narrow_output)."""

    def __init__(self, low: float, high: float, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)

    def call(self, inputs):
        return keras.ops.clip(inputs, self.low, self.high)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


def narrow_output(model: keras.Model, calibration: np.ndarray) -> tuple[keras.Model, list[str]]:
    """(`model` with its logits clipped to where the calibration images' top classes fall, a
    line saying what was done), or (`model`, why not)."""
    from tfsubspace.distill.trainer import ends_in_softmax

    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2 or (model.outputs[0].shape[-1] or 0) < 2:
        return model, ["output: not one (batch, classes) output; left alone"]
    logits = predict(model, calibration)
    rows = logits.sum(-1)
    if ends_in_softmax(model) or (logits.min() >= 0 and logits.max() <= 1 and np.allclose(rows, 1, atol=1e-3)):
        return model, ["output: probabilities (a softmax), whose int8 range is fixed; left alone"]
    ordered = np.sort(logits, -1)
    full = float(logits.min()), float(logits.max())
    low, high = max(float(ordered[:, -1].min()) - MARGIN, full[0]), min(float(ordered[:, -2].max()) + MARGIN, full[1])
    if high <= low:
        return model, ["output: the logits do not vary over the calibration images; left alone"]
    if high - low > 0.9 * (full[1] - full[0]):
        return model, [f"output: the logits' range [{full[0]:.3g}, {full[1]:.3g}] is where the top classes fall; kept"]
    clipped = ClipOutput(low, high, name=f"{model.name}_clip_output")(model.outputs[0])
    narrowed = keras.Model(model.inputs, clipped, name=model.name)
    return narrowed, [
        f"output: logits clipped to [{low:.3g}, {high:.3g}] (they span [{full[0]:.3g}, {full[1]:.3g}]): "
        f"{(full[1] - full[0]) / (high - low):.1f}x finer int8 steps; top-1 kept and softmax probabilities within "
        f"{(logits.shape[-1] - 1) * np.exp(-MARGIN):.1g} on images like the calibration ones"
    ]
