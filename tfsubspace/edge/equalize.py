"""Cross-layer equalization as an exact float rewrite (equalize).

For two linear layers joined by a ReLU (or no activation), through max-pooling, dropout and
flatten, relu(z / k) = relu(z) / k for k > 0: dividing output channel c of the first layer
by k[c] and multiplying input channel c of the second by k[c] keeps the model's function.
int8 quantizes the tensor between them with one scale for all its channels, and the second
layer's kernel with one scale per output channel over all its input channels, so k trades
the two: with a[c] the channel's largest activation (on calibration images) and r[c] the
second kernel's largest weight on that input channel, k[c] = sqrt(a[c] / r[c]) gives both
the same relative range (the balance of Nagel et al.'s data-free quantization, with measured
activation ranges in place of the first layer's weights). A depthwise second layer has one
scale per channel anyway, so there k[c] makes every activation channel the same range (a
SeparableConv2D second layer too: its input meets the depthwise kernel first).
A SeparableConv2D is itself such a chain with no activation: int8 writes its depthwise output
to a tensor of one scale before the pointwise kernel reads it, so each SeparableConv2D's
depthwise output channels are equalized against its pointwise kernel the same way (depthwise
kernel channel c divided by k[c], pointwise input channel c multiplied by it).
ReLU6 clips at 6, and 6 / k is not 6: chains through ReLU6 are left alone (and reported).
Chains into a merge (Add, Concatenate) or read twice are left alone.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tfsubspace.edge import graphedit as ge

_MAX_FACTOR = 1e4  # k is kept within [1 / _MAX_FACTOR, _MAX_FACTOR]


@dataclasses.dataclass
class _Chain:
    first: object  # node of the first linear layer
    tail: list  # BiasMap / activation nodes after it (scaled with it)
    path: list  # channel-preserving / Flatten nodes to the second layer
    second: object  # node of the second linear layer
    end: object  # the node whose output is the equalized tensor (before the path)


def _chains(g: ge.Graph) -> tuple[list[_Chain], list[str]]:
    chains, skipped = [], []
    for node in g.nodes:
        if not (node.sub is None and g.editable(node) and ge.is_linear_layer(node.layer)):
            continue
        kind = ge.activation_kind(node.layer)
        tail, end, reason = [], node, None
        while kind == "linear":  # a split activation: BiasMap, then the activation layer
            nxt = g.single_consumer(end)
            if nxt is None or not g.editable(nxt):
                break
            if isinstance(nxt.layer, ge.BiasMap):
                tail.append(nxt)
                end = nxt
                continue
            if isinstance(nxt.layer, (keras.layers.ReLU, keras.layers.Activation)):
                kind = ge.activation_kind(nxt.layer)
                tail.append(nxt)
                end = nxt
            break
        if kind == "relu6":
            reason = "ReLU6 clips at 6"
        elif kind not in ("linear", "relu"):
            reason = f"activation {kind or 'of another kind'}"
        path, second, cur = [], None, end
        while reason is None:
            nxt = g.single_consumer(cur)
            if nxt is None or not g.editable(nxt):
                reason = "its output is read twice, merged, or a model output"
            elif ge.is_linear_layer(nxt.layer):
                second = nxt
                break
            elif isinstance(nxt.layer, (*ge.CHANNEL_PRESERVING, keras.layers.Flatten)):
                if getattr(nxt.layer, "keepdims", False):
                    reason = f"{nxt.layer.name!r} keeps dims"
                path.append(nxt)
                cur = nxt
            else:
                reason = f"it is read by {type(nxt.layer).__name__} {nxt.layer.name!r}"
        if second is None:
            if node.outputs[0].key in g.outputs:
                continue  # the model's output layer: nothing after it to equalize with
            skipped.append(f"{node.layer.name}: not equalized ({reason})")
            continue
        chains.append(_Chain(node, tail, path, second, end))
    return chains, skipped


def _activation_ranges(model: keras.Model, chains: list[_Chain], images: np.ndarray) -> list[np.ndarray]:
    """The largest |value| of each channel of each chain's equalized tensor on `images`."""
    probe = keras.Model(model.inputs, [c.end.layer.output for c in chains])
    ranges = [np.zeros(c.end.layer.output.shape[-1]) for c in chains]
    for start in range(0, len(images), 128):
        outs = probe(images[start : start + 128], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, out in enumerate(outs):
            values = np.abs(keras.ops.convert_to_numpy(out))
            ranges[i] = np.maximum(ranges[i], values.reshape(-1, values.shape[-1]).max(0))
    return ranges


def _depthwise_ranges(model: keras.Model, nodes: list, images: np.ndarray) -> list[np.ndarray]:
    """The largest |value| of each depthwise output channel of each SeparableConv2D node."""
    probe = keras.Model(model.inputs, [n.layer.input for n in nodes])
    ranges = [np.zeros(n.layer.input.shape[-1] * n.layer.depth_multiplier) for n in nodes]
    for start in range(0, len(images), 128):
        outs = probe(images[start : start + 128], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, (node, x) in enumerate(zip(nodes, outs)):
            layer = node.layer
            y = keras.ops.depthwise_conv(
                x, layer.depthwise_kernel, layer.strides, layer.padding, layer.data_format, layer.dilation_rate
            )
            values = np.abs(keras.ops.convert_to_numpy(y))
            ranges[i] = np.maximum(ranges[i], values.reshape(-1, values.shape[-1]).max(0))
    return ranges


def _balance(a: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, live): k[c] = sqrt(a[c] / r[c]) on live channels (a, r > 0), geometric mean 1, clipped."""
    k = np.ones(len(a))
    live = (a > 0) & (r > 0)
    if np.any(live):
        k[live] = np.sqrt(a[live] / r[live])
        k[live] /= np.exp(np.mean(np.log(k[live])))
    return np.clip(k, 1 / _MAX_FACTOR, _MAX_FACTOR), live


def equalize(model: keras.Model, images: np.ndarray) -> tuple[keras.Model, list[str]]:
    """(the model with each ReLU/linear chain of two linear layers, and each SeparableConv2D's
    depthwise/pointwise pair, equalized; a line per chain).

    `images` (in the range the model takes) give the activation ranges; see the module doc.
    """
    g = ge.Graph(model)
    chains, report = _chains(g)
    separable = [n for n in g.nodes if n.sub is None and g.editable(n) and ge.is_separable(n.layer)]
    separable = [n for n in separable if ge.is_linear_layer(n.layer)]
    if not chains and not separable:
        return model, report
    ranges = _activation_ranges(model, chains, images) if chains else []
    kernels = {}

    def state(layer):
        if layer.name not in kernels:
            kernels[layer.name] = list(ge.kernel_and_bias(layer))
        return kernels[layer.name]

    maps = {}
    for chain, a in reversed(list(zip(chains, ranges))):  # the second layer's output scale is final
        second = chain.second.layer
        w2 = state(second)[0]
        flatten = next((n for n in chain.path if isinstance(n.layer, keras.layers.Flatten)), None)
        channels = len(a)
        if isinstance(second, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            k = np.ones(channels)
            live = a > 0
            k[live] = a[live]
        else:
            if isinstance(second, keras.layers.Dense):
                rows = np.abs(w2).max(axis=1)
                r = rows.reshape(-1, channels).max(0) if flatten is not None else rows
            else:
                r = np.abs(w2).max(axis=(0, 1, 3))
            k = np.ones(channels)
            live = (a > 0) & (r > 0)
            k[live] = np.sqrt(a[live] / r[live])
        if not np.any(live):
            report.append(f"{chain.first.layer.name} -> {second.name}: not equalized (no live channel)")
            continue
        k[live] /= np.exp(np.mean(np.log(k[live])))  # the geometric mean stays 1
        k = np.clip(k, 1 / _MAX_FACTOR, _MAX_FACTOR)
        first = state(chain.first.layer)
        first[0] = ge.scale_outputs(chain.first.layer, first[0], 1 / k)
        first[1] = first[1] / k
        for node in chain.tail:
            if isinstance(node.layer, ge.BiasMap):
                current = maps.get(node.layer.name, np.asarray(node.layer.get_weights()[0], np.float64))
                maps[node.layer.name] = current / k
        factor = k
        if flatten is not None:
            factor = np.tile(k, int(np.prod(flatten.inputs[0].shape[1:-1])))
        state(second)[0] = ge.scale_inputs(second, w2, factor)
        spread = a[live].max() / max(a[live].min(), 1e-12)
        after = (a / k)[live]
        report.append(
            f"{chain.first.layer.name} -> {second.name}: activation range spread {spread:.3g}x -> "
            f"{after.max() / max(after.min(), 1e-12):.3g}x"
        )
    for node, a in zip(separable, _depthwise_ranges(model, separable, images) if separable else []):
        layer = node.layer
        depthwise, pointwise = state(layer)[0]
        k, live = _balance(a, np.abs(pointwise).max(axis=(0, 1, 3)))
        if not np.any(live):
            report.append(f"{layer.name}: depthwise output not equalized (no live channel)")
            continue
        state(layer)[0] = (depthwise / k.reshape(1, 1, *depthwise.shape[2:]), pointwise * k.reshape(1, 1, -1, 1))
        after = (a / k)[live]
        report.append(
            f"{layer.name}: depthwise output range spread {a[live].max() / max(a[live].min(), 1e-12):.3g}x -> "
            f"{after.max() / max(after.min(), 1e-12):.3g}x"
        )
    edits = {}
    for name, (kernel, bias) in kernels.items():
        layer = model.get_layer(name)
        weights, config = ge.linear_weights(layer, kernel, bias)
        edits[name] = ge.LayerEdit(weights=weights, config=config)
    for name, bias_map in maps.items():
        dtype = model.get_layer(name).get_weights()[0].dtype
        edits[name] = ge.LayerEdit(weights=[bias_map.astype(dtype)])
    return ge.rebuild(model, edits), report
