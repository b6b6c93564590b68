"""Parameter and multiply-accumulate (MAC) counts of Keras models, per layer and in total.

MACs count the multiply-accumulates of one forward pass of one example through the layers
that do them: convolutions (plain, grouped, depthwise, separable, transposed) and Dense.
BatchNormalization is not counted (it folds into the preceding layer on export), nor are
activations, pooling and merges (no multiply-accumulates). A layer called several times
(shared weights) counts once per call in the model's graph, and a nested model's layers once
per call of the nested model. Models without a graph (subclassed ones) are refused: their
layer calls are Python code that cannot be counted without running it.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import keras

from tfsubspace import keras_private
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.prune.graph import functional_view


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One row of layer_stats(): a layer's parameters, and its MACs and output elements (per
    example) summed over its calls."""

    name: str
    class_name: str
    params: int
    macs: int
    outputs: int = 0


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


def _conv_macs(layer, n_in: int, n_out: int, in_shape, out_shape) -> int:
    kernel = _prod(layer.kernel_size)
    spatial_out = _prod(out_shape[1:-1])
    if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.DepthwiseConv1D)):
        return spatial_out * kernel * n_out
    if isinstance(layer, (keras.layers.SeparableConv2D, keras.layers.SeparableConv1D)):
        depthwise_channels = n_in * layer.depth_multiplier
        return spatial_out * (kernel * depthwise_channels + depthwise_channels * n_out)
    if isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose, keras.layers.Conv3DTranspose)):
        return _prod(in_shape[1:-1]) * kernel * n_in * n_out
    groups = getattr(layer, "groups", 1)
    return spatial_out * kernel * (n_in // groups) * n_out


def layer_macs(layer, in_shape, out_shape) -> int:
    """MACs of one call of `layer` from a tensor of `in_shape` to one of `out_shape` (batch
    axis first, channels last). The channel counts come from the shapes, not the layer, so
    the same call can be priced at other widths (a pruning plan's)."""
    n_in, n_out = int(in_shape[-1]), int(out_shape[-1])
    if isinstance(layer, keras.layers.Dense):
        return _prod(in_shape[1:]) * n_out
    if hasattr(layer, "kernel_size"):  # every convolution, depthwise and transposed included
        return _conv_macs(layer, n_in, n_out, in_shape, out_shape)
    return 0


def _calls_by_layer(model: keras.Model) -> dict[int, list]:
    """The nodes of `model`'s own graph, keyed by the id of the layer each one calls.

    `layer._inbound_nodes` is not enough: a layer also keeps the nodes of graphs it is not
    part of in this model (those a Sequential builds as layers are added, or that loading a
    .keras file builds), and summing them counts a layer several times over.
    """
    calls = collections.defaultdict(list)
    for nodes in keras_private.nodes_by_depth(functional_view(model)).values():
        for node in nodes:
            if node.operation is not None and not node.is_input:
                calls[id(node.operation)].append(node)
    return calls


def layer_stats(model: keras.Model) -> list[LayerStats]:
    """Per-layer parameter and MAC counts, nested models expanded into their layers."""
    calls = _calls_by_layer(model)
    rows = []
    for layer in model.layers:
        nodes = calls.get(id(layer), [])
        if isinstance(layer, keras.Model):
            rows.extend(
                dataclasses.replace(row, macs=row.macs * len(nodes), outputs=row.outputs * len(nodes))
                for row in layer_stats(layer)
            )
            continue
        macs = outputs = 0
        for node in nodes:
            outputs += sum(_prod(t.shape[1:]) for t in node.output_tensors if None not in t.shape[1:])
            in_shape, out_shape = tuple(node.input_tensors[0].shape), tuple(node.output_tensors[0].shape)
            if any(d is None for d in in_shape[1:]) or any(d is None for d in out_shape[1:]):
                if hasattr(layer, "kernel_size") or isinstance(layer, keras.layers.Dense):
                    raise UnsupportedModelError(
                        f"Layer {layer.name!r} has an unknown input or output size {in_shape} -> {out_shape}; "
                        "build the model with a fully known input shape (keras.Input(shape=(H, W, C)))."
                    )
                continue
            macs += layer_macs(layer, in_shape, out_shape)
        rows.append(LayerStats(layer.name, type(layer).__name__, int(layer.count_params()), int(macs), int(outputs)))
    return rows


def count_params(model: keras.Model) -> int:
    """All parameters of `model`, trainable or not (BN moving statistics included)."""
    return int(model.count_params())


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass of one example."""
    return sum(row.macs for row in layer_stats(model))


def count_outputs(model: keras.Model) -> int:
    """Elements of every layer call's outputs in one forward pass of one example: the memory
    traffic that MACs miss (normalization, activations, depthwise convolutions)."""
    return sum(row.outputs for row in layer_stats(model))
