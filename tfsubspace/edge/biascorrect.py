"""Empirical bias correction of a float model from its int8 file (correct_biases).

Rounding weights and inputs shifts a linear layer's outputs on average, and later layers see
the shift as signal. For each Conv2D, DepthwiseConv2D and Dense layer, the int8 file's output
of that layer is compared with the float layer applied to the int8 file's own (dequantized)
input of that layer, on the calibration images, so that each layer's own shift is measured
apart from what earlier layers did; the mean difference per output channel, over the
positions where neither side is clipped by its activation or its int8 range, is subtracted
from the layer's bias. Layers are found in the file by their weights (the float32 file of the
same model holds them exactly), so the correction needs no tensor names. A SeparableConv2D is
two ops there (DEPTHWISE_CONV_2D, then a 1x1 CONV_2D holding its pointwise kernel): it is found
by its pointwise kernel and measured from the depthwise op's input, both ops' shift together.
"""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.edge import graphedit as ge

_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _tflite_kernel(layer, kernel: np.ndarray) -> np.ndarray:
    """A Keras kernel in the layout the converter writes it (a SeparableConv2D's pointwise one)."""
    if ge.is_separable(layer):
        return kernel.transpose(3, 0, 1, 2)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, cin, mult = kernel.shape
        return kernel.reshape(1, kh, kw, cin * mult)
    if isinstance(layer, keras.layers.Dense):
        return kernel.T
    return kernel.transpose(3, 0, 1, 2)


def _match_layers(model: keras.Model, float_interpreter) -> dict:
    """Keras linear layer name -> (float file's op output tensor name, input tensor name)."""
    details = {d["index"]: d for d in float_interpreter.get_tensor_details()}
    all_ops = float_interpreter._get_ops_details()
    ops = [op for op in all_ops if op["op_name"] in _OPS]
    producer = {int(out): op for op in all_ops for out in op["outputs"]}
    found = {}
    for layer in model.layers:
        if not ge.is_linear_layer(layer):
            continue
        kernel = layer.pointwise_kernel if ge.is_separable(layer) else layer.kernel
        want = _tflite_kernel(layer, np.asarray(keras.ops.convert_to_numpy(kernel)))
        for op in ops:
            weights = details[int(op["inputs"][1])]
            if tuple(weights["shape"]) != want.shape:
                continue
            if np.allclose(float_interpreter.get_tensor(weights["index"]), want, rtol=1e-5, atol=1e-7):
                source = int(op["inputs"][0])
                if ge.is_separable(layer):  # the pointwise op reads the depthwise op's output
                    depthwise = producer.get(source)
                    if depthwise is None or depthwise["op_name"] != "DEPTHWISE_CONV_2D":
                        continue
                    source = int(depthwise["inputs"][0])
                found[layer.name] = (details[int(op["outputs"][0])]["name"], details[source]["name"])
                break
    return found


def correct_biases(
    model: keras.Model, int8: bytes, images: np.ndarray, *, limit: int = 200
) -> tuple[keras.Model, list[str]]:
    """(the model with each linear layer's bias corrected by the int8 file's mean shift, a line
    per corrected layer). `int8` is a full-int8 file of `model` at a fixed batch; `images` are
    calibration images in the range the model takes. See the module doc."""
    from tfsubspace.edge.convert import convert, with_batch_size
    from tfsubspace.edge.diagnose import _dequantize, _interpreter
    from tfsubspace.edge.runtime import _quantize

    q = _interpreter(int8)
    q_in = q.get_input_details()[0]
    batch = int(q_in["shape"][0]) or 1
    f = _interpreter(convert(with_batch_size(model, batch), "float32"))
    matched = _match_layers(model, f)
    q_index = {d["name"]: d for d in q.get_tensor_details()}

    def same_shapes(name, names):  # the converter may fuse a padding into the op: its input differs
        layer = model.get_layer(name)
        if names[0] not in q_index or names[1] not in q_index:
            return False
        want_in = int(np.prod(layer.input.shape[1:])) * batch
        want_out = int(np.prod(layer.output.shape[1:])) * batch
        return int(np.prod(q_index[names[1]]["shape"])) == want_in and int(np.prod(q_index[names[0]]["shape"])) == (
            want_out
        )

    skipped = sorted(set(matched) - {k for k, v in matched.items() if same_shapes(k, v)})
    matched = {k: v for k, v in matched.items() if k not in skipped}
    if not matched:
        return model, ["no linear layer found in the int8 file: biases not corrected"]
    sums = dict.fromkeys(matched, 0.0)
    counts = dict.fromkeys(matched, 0.0)
    probes = {}
    for name in matched:
        layer = model.get_layer(name)
        probes[name] = layer
    n = min(limit, len(images)) // batch * batch
    for start in range(0, n, batch):
        q.set_tensor(q_in["index"], _quantize(images[start : start + batch].astype(np.float32), q_in))
        q.invoke()
        for name, (out_name, in_name) in matched.items():
            d_in, d_out = q_index[in_name], q_index[out_name]
            x = _dequantize(q.get_tensor(d_in["index"]), d_in)
            got_raw = q.get_tensor(d_out["index"])
            got = _dequantize(got_raw, d_out)
            layer = probes[name]
            ref = np.asarray(keras.ops.convert_to_numpy(layer(x.reshape((batch, *layer.input.shape[1:]))))).reshape(
                got.shape
            )
            mask = _unclipped(layer, ref, got_raw, d_out)
            diff = np.where(mask, got - ref, 0.0).reshape(-1, got.shape[-1])
            sums[name] = sums[name] + diff.sum(0)
            counts[name] = counts[name] + mask.reshape(-1, got.shape[-1]).sum(0)
    edits, report = {}, []
    for name in matched:
        layer = model.get_layer(name)
        kernel, bias = ge.kernel_and_bias(layer)
        shift = np.where(counts[name] > 0, sums[name] / np.maximum(counts[name], 1), 0.0)
        weights, config = ge.linear_weights(layer, kernel, bias - shift)
        edits[name] = ge.LayerEdit(weights=weights, config=config)
        step = float(q_index[matched[name][0]]["quantization"][0])
        report.append(
            f"{name}: mean int8 shift up to {np.max(np.abs(shift)):.3g} ({np.max(np.abs(shift)) / step:.2f} steps)"
        )
    report += [f"{name}: not corrected (its int8 op reads or writes another shape)" for name in skipped]
    return ge.rebuild(model, edits), report


def _unclipped(layer, ref: np.ndarray, raw: np.ndarray, detail) -> np.ndarray:
    """Positions where the float output is in its activation's linear part and the int8 one is
    not at the end of its range."""
    info = np.iinfo(raw.dtype)
    mask = (raw > info.min) & (raw < info.max)
    kind = ge.activation_kind(layer)
    if kind in ("relu", "relu6"):
        mask &= ref > 0
    if kind == "relu6":
        mask &= ref < 6
    return mask
