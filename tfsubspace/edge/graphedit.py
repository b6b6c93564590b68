"""Float graph rewrites of a Keras model for int8 export: the edits, the rebuild, the check.

A rewrite (fold.py, equalize.py) reads a model's traced graph (tfsubspace.prune.graph), decides
new weights and config for some layers, layers to drop (folded into others) and layers to
insert after others, and `rebuild(model, edits)` makes the new model from fresh copies of the
layers; the original is never changed. `max_abs_diff` measures a rewrite against the model it
came from. The helpers here name the layers rewrites understand: the linear layers whose
output channels can be scaled (Conv2D, DepthwiseConv2D, SeparableConv2D, Dense) and the
activations. A SeparableConv2D's "kernel" is the pair (depthwise kernel, pointwise kernel):
its inputs scale the depthwise kernel, its outputs the pointwise one.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tfsubspace.prune import graph as graph_lib

LINEAR = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)
# Layers that commute with a per-channel affine map y = s * x + t (s > 0): they move values
# (or average them) without mixing channels. Padding would add zeros, so it is not here.
CHANNEL_PRESERVING = (
    keras.layers.MaxPooling2D,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalAveragePooling2D,
)


class RewriteError(Exception):
    """A rewrite could not keep the model's function (the message names the layer)."""


@dataclasses.dataclass
class LayerEdit:
    """What a rebuild changes about one layer."""

    weights: list | None = None  # new weights (None: the layer's own)
    config: dict = dataclasses.field(default_factory=dict)  # get_config() overrides
    after: list = dataclasses.field(default_factory=list)  # (new layer, weights or None) called on its output
    skip: bool = False  # the call is dropped: its output is its (single) input
    replace: tuple | None = None  # (new layer, weights): called in the layer's place


@keras.saving.register_keras_serializable(package="tfsubspace")
class BiasMap(keras.layers.Layer):
    """Adds a constant (H, W, C) map: a folded shift's correction at 'same'-padding borders."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(d) for d in shape)

    def build(self, input_shape):
        self.bias_map = self.add_weight(name="bias_map", shape=self.shape, initializer="zeros", trainable=False)

    def call(self, x):
        return x + keras.ops.cast(self.bias_map, x.dtype)

    def get_config(self):
        return {**super().get_config(), "shape": list(self.shape)}


class Graph:
    """A traced model with the producer and consumers of every tensor (top level only)."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.g = graph_lib.trace(model)
        self.nodes = list(self.g.nodes)
        self.producer = {}
        self.consumers: dict[int, list] = {}
        calls: dict[int, int] = {}
        for node in self.nodes:
            calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
            for ref in node.outputs:
                self.producer[ref.key] = node
            for ref in node.inputs:
                self.consumers.setdefault(ref.key, []).append(node)
        self.outputs = {ref.key for ref in self.g.outputs}
        self.shared = {k for k, v in calls.items() if v > 1}

    def single_consumer(self, node):
        """The only node reading `node`'s output, or None (several readers, or a model output)."""
        key = node.outputs[0].key
        users = self.consumers.get(key, [])
        if len(users) != 1 or key in self.outputs:
            return None
        return users[0]

    def editable(self, node) -> bool:
        """A layer called once, not a nested model, with one input and one output."""
        return (
            node.sub is None and id(node.layer) not in self.shared and len(node.inputs) == 1 and len(node.outputs) == 1
        )


def activation_kind(layer) -> str | None:
    """ "linear", "relu" or "relu6" for a layer's activation (fused or its own), else None."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    fn = getattr(layer, "activation", None)
    if fn is None:
        return None
    for name in ("linear", "relu", "relu6"):
        if fn is getattr(keras.activations, name):
            return name
    return None


def is_separable(layer) -> bool:
    return isinstance(layer, keras.layers.SeparableConv2D)


def is_linear_layer(layer) -> bool:
    """Conv2D (one group, channels last), DepthwiseConv2D, SeparableConv2D or Dense on the last axis."""
    if not isinstance(layer, LINEAR):
        return False
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D):
        return getattr(layer, "groups", 1) == 1
    return True


def _numpy64(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def kernel_and_bias(layer) -> tuple:
    """(kernel, bias) of a linear layer as float64, a zero bias where it has none; a
    SeparableConv2D's kernel is the pair (depthwise, pointwise)."""
    if is_separable(layer):
        kernel = (_numpy64(layer.depthwise_kernel), _numpy64(layer.pointwise_kernel))
    else:
        kernel = _numpy64(layer.kernel)
    out = out_channels(layer, kernel)
    bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float64) if layer.use_bias else np.zeros(out)
    return kernel, bias


def out_channels(layer, kernel) -> int:
    if is_separable(layer):
        return kernel[1].shape[-1]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return kernel.shape[2] * kernel.shape[3]
    return kernel.shape[-1]


def scale_outputs(layer, kernel, factor: np.ndarray):
    """`kernel` with output channel c multiplied by factor[c]."""
    if is_separable(layer):
        return kernel[0], kernel[1] * factor
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, cin, mult = kernel.shape
        return kernel * factor.reshape(1, 1, cin, mult)
    return kernel * factor


def scale_inputs(layer, kernel, factor: np.ndarray):
    """`kernel` with input channel (or Dense input feature) c multiplied by factor[c]."""
    if is_separable(layer):
        return kernel[0] * factor.reshape(1, 1, -1, 1), kernel[1]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return kernel * factor.reshape(1, 1, -1, 1)
    if isinstance(layer, keras.layers.Dense):
        return kernel * factor.reshape(-1, 1)
    return kernel * factor.reshape(1, 1, -1, 1)


def linear_weights(layer, kernel, bias: np.ndarray) -> tuple[list, dict]:
    """(weights, config overrides) that give `layer` this kernel and bias (adding a bias)."""
    config = {} if layer.use_bias else {"use_bias": True}
    if is_separable(layer):
        dtype = keras.ops.convert_to_numpy(layer.pointwise_kernel).dtype
        return [kernel[0].astype(dtype), kernel[1].astype(dtype), bias.astype(dtype)], config
    dtype = keras.ops.convert_to_numpy(layer.kernel).dtype
    return [kernel.astype(dtype), bias.astype(dtype)], config


def rebuild(model: keras.Model, edits: dict, name: str | None = None) -> keras.Model:
    """A new model: `model` with `edits` (layer name -> LayerEdit) applied; the layers are fresh
    copies with their weights, `model` itself is left as it was."""
    g = graph_lib.trace(model)
    tensors, inputs = {}, []
    for ref, old in zip(g.inputs, graph_lib.functional_view(model).inputs):
        tensors[ref.key] = keras.Input(batch_shape=old.shape, dtype=old.dtype, name=old.name)
        inputs.append(tensors[ref.key])
    copies: dict[int, keras.layers.Layer] = {}
    pending = []
    for node in g.nodes:
        edit = edits.get(node.layer.name) if node.sub is None else None
        if edit is not None and edit.skip:
            tensors[node.outputs[0].key] = tensors[node.inputs[0].key]
            continue
        layer = copies.get(id(node.layer))
        if layer is None:
            if node.sub is not None:
                layer = node.layer  # a nested model is kept whole
            elif edit is not None and edit.replace is not None:
                layer, weights = edit.replace
                pending.append((layer, weights))
            else:
                config = {**node.layer.get_config(), **(edit.config if edit else {})}
                layer = type(node.layer).from_config(config)
                weights = edit.weights if edit is not None and edit.weights is not None else node.layer.get_weights()
                pending.append((layer, weights))
            copies[id(node.layer)] = layer
        out = layer(*graph_lib.substitute(node.args, tensors), **graph_lib.substitute(node.kwargs, tensors))
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if edit is not None:
            for extra, weights in edit.after:
                outs[0] = extra(outs[0])
                if weights is not None:
                    pending.append((extra, weights))
        for ref, t in zip(node.outputs, outs):
            tensors[ref.key] = t
    for layer, weights in pending:
        layer.set_weights(weights)
    outputs = [tensors[ref.key] for ref in g.outputs]
    return keras.Model(
        inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0], name=name or model.name
    )


def predict(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outs = [
        keras.ops.convert_to_numpy(model(images[i : i + batch_size], training=False))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs)


def max_abs_diff(a: keras.Model, b: keras.Model, images: np.ndarray) -> float:
    """The largest absolute difference of the two models' outputs on `images`."""
    return float(np.max(np.abs(predict(a, images) - predict(b, images))))
