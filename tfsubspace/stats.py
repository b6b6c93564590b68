"""Parameter and multiply-accumulate (MAC) counts of Keras models, per layer and in total.

MACs count the multiply-accumulates of one forward pass of one example through the layers
that do them: convolutions (plain, grouped, depthwise, separable, transposed) and Dense.
BatchNormalization is not counted (it folds into the preceding layer on export), nor are
activations, pooling and merges (no multiply-accumulates). A layer called several times
(shared weights) counts once per call.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from tfsubspace.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class LayerStats:
    name: str
    class_name: str
    params: int
    macs: int


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


def _conv_macs(layer, in_shape, out_shape) -> int:
    kernel = _prod(layer.kernel_size)
    spatial_out = _prod(out_shape[1:-1])
    if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.DepthwiseConv1D)):
        return spatial_out * kernel * int(in_shape[-1]) * layer.depth_multiplier
    if isinstance(layer, (keras.layers.SeparableConv2D, keras.layers.SeparableConv1D)):
        depthwise_channels = int(in_shape[-1]) * layer.depth_multiplier
        return spatial_out * (kernel * depthwise_channels + depthwise_channels * layer.filters)
    if isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose, keras.layers.Conv3DTranspose)):
        return _prod(in_shape[1:-1]) * kernel * int(in_shape[-1]) * layer.filters
    groups = getattr(layer, "groups", 1)
    return spatial_out * kernel * (int(in_shape[-1]) // groups) * layer.filters


def _layer_macs(layer, in_shape, out_shape) -> int:
    if isinstance(layer, keras.layers.Dense):
        return _prod(in_shape[1:]) * layer.units
    if hasattr(layer, "kernel_size"):  # every convolution, depthwise and transposed included
        return _conv_macs(layer, in_shape, out_shape)
    return 0


def _calls(layer):
    """(input shape, output shape) of each call of `layer` in its model's graph."""
    for node in layer._inbound_nodes:
        inputs, outputs = node.input_tensors, node.output_tensors
        if not inputs or not outputs:
            continue
        yield tuple(inputs[0].shape), tuple(outputs[0].shape)


def layer_stats(model: keras.Model) -> list[LayerStats]:
    """Per-layer parameter and MAC counts, nested models expanded into their layers."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a keras.Model. Received: {type(model).__name__}")
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "_inbound_nodes") and layer.layers:
            rows.extend(layer_stats(layer))
            continue
        macs = 0
        for in_shape, out_shape in _calls(layer):
            if any(d is None for d in in_shape[1:]) or any(d is None for d in out_shape[1:]):
                if hasattr(layer, "kernel_size") or isinstance(layer, keras.layers.Dense):
                    raise UnsupportedModelError(
                        f"Layer {layer.name!r} has an unknown input or output size {in_shape} -> {out_shape}; "
                        "build the model with a fully known input shape (keras.Input(shape=(H, W, C)))."
                    )
                continue
            macs += _layer_macs(layer, in_shape, out_shape)
        rows.append(LayerStats(layer.name, type(layer).__name__, int(layer.count_params()), int(macs)))
    return rows


def count_params(model: keras.Model) -> int:
    """All parameters of `model`, trainable or not (BN moving statistics included)."""
    return int(model.count_params())


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass of one example."""
    return sum(row.macs for row in layer_stats(model))
