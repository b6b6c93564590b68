"""BatchNormalization folding as an exact float rewrite (fold_batchnorm).

A BatchNormalization computes y = s * x + t per channel (s = gamma / sqrt(var + eps),
t = beta - mean * s). Where it can go:
- after a linear layer with no activation (Conv -> BN): into that layer's kernel and bias
  (a SeparableConv2D's pointwise kernel and bias). This holds wherever the BN's output goes
  (an Add, a Concatenate, a model output) as long as the BN is the linear layer's only reader;
- after a ReLU that ends a linear layer (Conv -> ReLU -> BN, the layer order of many Keras
  tutorials): s * relu(z) = relu(s * z) for s >= 0, so |s| goes back into the linear layer's
  output channels, and the sign and the shift t go forward into the next Conv/Dense/Depthwise
  (through max-pooling, dropout and flatten) as input scaling and bias. Scaling *before* the
  int8 activation tensor matters: the ReLU output is quantized with one scale for all its
  channels, and a channel that the BatchNormalization later multiplies by 30 while another is
  multiplied by 0.04 keeps almost none of its information;
- otherwise (after a ReLU6, or no linear layer before it): the whole affine map goes forward
  into the next linear layer.
A shift folded into a 'same'-padded convolution is exact in the interior, not at the borders,
where the original saw zero padding of the shifted tensor: the difference is a constant map,
added by a BiasMap layer after the convolution (before its activation). A BatchNormalization
that can go nowhere is kept (with s = +-1 where its scale went back) and reported.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tfsubspace.edge import graphedit as ge


@dataclasses.dataclass
class _State:
    """A linear layer's weights as the folds leave them."""

    layer: object
    kernel: np.ndarray
    bias: np.ndarray
    bias_map: np.ndarray | None = None


def batchnorm_affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of y = s * x + t for an inference-mode BatchNormalization."""
    var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
    mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float64) if layer.scale else np.ones_like(var)
    beta = np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float64) if layer.center else np.zeros_like(var)
    s = gamma / np.sqrt(var + layer.epsilon)
    return s, beta - mean * s


def _foldable_bn(layer) -> bool:
    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    return axis == -1 or (axis is not None and axis == len(layer.input.shape) - 1)


class _Folder:
    def __init__(self, model: keras.Model):
        self.g = ge.Graph(model)
        self.states: dict[str, _State] = {}
        self.edits: dict[str, ge.LayerEdit] = {}
        self.report: list[str] = []

    def state(self, layer) -> _State:
        if layer.name not in self.states:
            kernel, bias = ge.kernel_and_bias(layer)
            self.states[layer.name] = _State(layer, kernel, bias)
        return self.states[layer.name]

    # -- where a BatchNormalization's input comes from ---------------------------------------
    def backward_target(self, bn_node):
        """(linear node, activation) when the BN reads a linear layer's output, directly or
        through one ReLU/ReLU6 layer, and is its only reader; else (None, reason)."""
        node = self.g.producer.get(bn_node.inputs[0].key)
        if node is None or not self.g.editable(node) or self.g.single_consumer(node) is not bn_node:
            return None, "its input is read elsewhere (or is the model input)"
        if ge.is_linear_layer(node.layer):
            kind = ge.activation_kind(node.layer)
            return (node, kind) if kind in ("linear", "relu") else (None, f"{node.layer.name!r} ends in {kind}")
        kind = ge.activation_kind(node.layer)
        if isinstance(node.layer, (keras.layers.ReLU, keras.layers.Activation)) and kind in ("relu", "relu6"):
            prev = self.g.producer.get(node.inputs[0].key)
            if (
                prev is not None
                and self.g.editable(prev)
                and ge.is_linear_layer(prev.layer)
                and ge.activation_kind(prev.layer) == "linear"
                and self.g.single_consumer(prev) is node
            ):
                return (prev, kind) if kind == "relu" else (None, "ReLU6 clips at 6: scaling through it is not exact")
        return None, f"it follows {type(node.layer).__name__} {node.layer.name!r}"

    # -- where its output goes ----------------------------------------------------------------
    def forward_target(self, bn_node, negative: bool):
        """(linear node, path) reading the BN's output through channel-preserving layers and
        Flatten, or (None, reason)."""
        node, path = bn_node, []
        while True:
            nxt = self.g.single_consumer(node)
            if nxt is None or not self.g.editable(nxt):
                return None, "its output has several readers, or is a model output or a merge input"
            if ge.is_linear_layer(nxt.layer):
                return nxt, path
            if isinstance(nxt.layer, (keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling2D)) and negative:
                return None, "a negative scale does not commute with max-pooling"
            if isinstance(nxt.layer, (*ge.CHANNEL_PRESERVING, keras.layers.Flatten)):
                if getattr(nxt.layer, "keepdims", False):
                    return None, f"{nxt.layer.name!r} keeps dims"
                path.append(nxt)
                node = nxt
                continue
            return None, f"it is read by {type(nxt.layer).__name__} {nxt.layer.name!r}"

    # -- the folds -----------------------------------------------------------------------------
    def scale_back(self, node, s):
        st = self.state(node.layer)
        st.kernel = ge.scale_outputs(node.layer, st.kernel, s)
        st.bias = st.bias * s
        if st.bias_map is not None:
            st.bias_map = st.bias_map * s

    def push_forward(self, target, path, bn_node, s, t):
        """Folds y = s * x + t (per channel of the BN's output) into `target`'s input."""
        layer = target.layer
        flatten = [n for n in path if isinstance(n.layer, keras.layers.Flatten)]
        if flatten:
            shape = flatten[0].inputs[0].shape
            spatial = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            s, t = np.tile(s, spatial), np.tile(t, spatial)  # Flatten of (H, W, C): channel fastest
        st = self.state(layer)
        original = st.kernel
        st.kernel = ge.scale_inputs(layer, st.kernel, s)
        if isinstance(layer, keras.layers.Dense):
            st.bias = st.bias + t @ original
            return None
        interior = _interior_shift(layer, original, t)
        st.bias = st.bias + interior
        padding = layer.padding
        if padding == "valid" or tuple(layer.kernel_size) == (1, 1):
            return None
        in_shape = target.inputs[0].shape
        if any(d is None for d in in_shape[1:]):
            return f"{layer.name!r} has a dynamic input shape"
        full = _shift_map(layer, original, t, in_shape)
        border = full - interior
        if np.max(np.abs(border)) > 0:
            st.bias_map = border if st.bias_map is None else st.bias_map + border
        return None

    def fold(self) -> keras.Model:
        seen = set()
        for bn in [n for n in self.g.nodes if n.sub is None and _foldable_bn(n.layer)]:
            if bn.layer.name in seen:
                continue
            seen.add(bn.layer.name)
            if not self.g.editable(bn):
                self.report.append(f"{bn.layer.name}: kept (called more than once)")
                continue
            s, t = batchnorm_affine(bn.layer)
            source, why_not_back = self.backward_target(bn)
            if source is not None and why_not_back == "linear":
                self.scale_back(source, s)
                st = self.state(source.layer)
                st.bias = st.bias + t
                self.edits[bn.layer.name] = ge.LayerEdit(skip=True)
                self.report.append(f"{bn.layer.name}: folded into {source.layer.name} (linear -> BN)")
                continue
            if source is not None:  # linear -> ReLU -> BN
                sign = np.where(s < 0, -1.0, 1.0)
                target, path = self.forward_target(bn, negative=bool(np.any(sign < 0)))
                self.scale_back(source, np.abs(s))
                if target is not None and self.push_forward(target, path, bn, sign, t) is None:
                    self.edits[bn.layer.name] = ge.LayerEdit(skip=True)
                    self.report.append(
                        f"{bn.layer.name}: scale into {source.layer.name} (through ReLU), "
                        f"shift into {target.layer.name}"
                    )
                else:
                    self.edits[bn.layer.name] = _affine_batchnorm(bn.layer, sign, t)
                    self.report.append(
                        f"{bn.layer.name}: scale into {source.layer.name} (through ReLU); "
                        f"shift kept as a BatchNormalization ({path})"
                    )
                continue
            target, path = self.forward_target(bn, negative=bool(np.any(s < 0)))
            if target is not None and self.push_forward(target, path, bn, s, t) is None:
                self.edits[bn.layer.name] = ge.LayerEdit(skip=True)
                self.report.append(f"{bn.layer.name}: folded into {target.layer.name} (BN -> linear)")
                continue
            self.report.append(f"{bn.layer.name}: kept ({why_not_back}; forward: {path})")
        for name, st in self.states.items():
            weights, config = ge.linear_weights(st.layer, st.kernel, st.bias)
            edit = ge.LayerEdit(weights=weights, config=config)
            if st.bias_map is not None:
                kind = ge.activation_kind(st.layer) or "linear"
                dtype = weights[0].dtype
                bias_map = ge.BiasMap(st.bias_map.shape, name=f"{name}_border")
                edit.config = {**config, "activation": "linear"}
                edit.after = [(bias_map, [st.bias_map.astype(dtype)])]
                if kind != "linear":
                    edit.after.append((keras.layers.Activation(kind, name=f"{name}_{kind}"), None))
            self.edits[name] = edit
        return ge.rebuild(self.g.model, self.edits)


def _affine_batchnorm(layer, s: np.ndarray, t: np.ndarray) -> ge.LayerEdit:
    """A BatchNormalization computing s * x + t (mean 0, variance 1 - eps)."""
    dtype = keras.ops.convert_to_numpy(layer.moving_mean).dtype
    ones = np.ones_like(s)
    weights = [s, t, np.zeros_like(s), ones * (1.0 - layer.epsilon)]
    return ge.LayerEdit(weights=[w.astype(dtype) for w in weights], config={"scale": True, "center": True})


def _interior_shift(layer, kernel, t: np.ndarray) -> np.ndarray:
    """What a per-channel input shift t adds to each output channel away from the borders."""
    if ge.is_separable(layer):
        depthwise, pointwise = kernel
        kh, kw, cin, mult = depthwise.shape
        return (depthwise.sum(axis=(0, 1)) * t.reshape(cin, 1)).reshape(-1) @ pointwise[0, 0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, cin, mult = kernel.shape
        return (kernel.sum(axis=(0, 1)) * t.reshape(cin, 1)).reshape(-1)
    return np.einsum("hwio,i->o", kernel, t)


def _shift_map(layer, kernel, t: np.ndarray, in_shape) -> np.ndarray:
    """What a per-channel input shift t adds at each output position (borders included)."""
    config = {**layer.get_config(), "use_bias": False, "activation": "linear", "name": None}
    probe = type(layer).from_config(config)
    x = np.broadcast_to(t.astype(np.float32), (1, *in_shape[1:])).copy()
    probe.build((1, *in_shape[1:]))
    probe.set_weights([k.astype(np.float32) for k in (kernel if ge.is_separable(layer) else (kernel,))])
    return np.asarray(keras.ops.convert_to_numpy(probe(x)), np.float64)[0]


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """(the model with its BatchNormalization layers folded where exact, one line per BN saying
    where it went or why it was kept). See the module doc."""
    folder = _Folder(model)
    folded = folder.fold()
    return folded, folder.report
