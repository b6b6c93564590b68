"""The int8 ranges that TFLite's calibrator measures wrong where an op works in place, repaired.

TFLite's calibrator logs each op's input tensors again after the op has run. When the
interpreter's memory planner lets an elementwise op (ADD, SUB, MUL) write its output into
the buffer of an input that nothing else reads, that second log reads the op's output, and
the input gets the union of its own range and the output's (tensorflow/tensorflow#127842).
The usual victim is the last, linear 1x1 convolution of a residual block (MobileNetV2's
"project" convolutions, ResNet's last conv of a block): its output is read only by the
residual ADD, so its int8 scale becomes that of the residual sum, two to seven times coarser
than its own values need.

`repair_shared_ranges` measures, on the calibration images, the float range of every
non-constant input of those ops in a float32 file of the same model (same tensor names), and
where the int8 file's range for it is wider than its own (it holds the own range and more),
sets the tensor's scale and zero point to those of its own range, computed as the converter
computes them (its other tensors' parameters are reproduced exactly this way; tested). The
int8 kernels of these ops and of the op that writes the tensor derive their rescaling from
the tensors' scales when the file is loaded, so changing them needs no other edit. Only
per-tensor int8 activations are touched; int16x8 files are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

ISSUE = "tensorflow/tensorflow#127842"
_IN_PLACE = ("ADD", "SUB", "MUL")  # elementwise ops whose output may take an input's buffer


@dataclasses.dataclass(frozen=True)
class Repair:
    """One tensor whose calibrated range was the union of its own and an in-place op's output's."""

    tensor: str
    op: str  # the in-place op that reads it
    calibrated: tuple[float, float]  # the range the calibrator gave it
    own: tuple[float, float]  # the range of its own float values, now its range

    def describe(self) -> str:
        finer = (self.calibrated[1] - self.calibrated[0]) / (self.own[1] - self.own[0])
        return (
            f"{self.tensor.split(';')[0]} (into {self.op}): [{self.calibrated[0]:.3g}, {self.calibrated[1]:.3g}] -> "
            f"[{self.own[0]:.3g}, {self.own[1]:.3g}] ({finer:.1f}x finer)"
        )


def int8_parameters(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of an int8 activation tensor whose values span [low, high], as the TFLite
    converter computes them: the range widened to hold 0, 255 steps, the zero point rounded half away
    from zero."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255.0
    zero = -128.0 - low / scale
    return scale, int(np.clip(np.sign(zero) * np.floor(abs(zero) + 0.5), -128, 127))


def _range(scale: float, zero: int) -> tuple[float, float]:
    return scale * (-128 - zero), scale * (127 - zero)


# Ops whose int8 kernels take their output scale from the file (they rescale to it), and ops that
# need their input's scale on their output (the converter ties the two; a tensor written by one of
# these is repaired together with its input, see _group).
_FREE_SCALE = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "MEAN")
_SAME_SCALE = ("MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "PAD", "PADV2", "TRANSPOSE")


class _Graph:
    """The parts of a flatbuffer model (flatbuffer_utils' object API) that the repair reads."""

    def __init__(self, model):
        from tensorflow.lite.python import schema_py_generated as schema

        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.int8 = schema.TensorType.INT8
        self.graph = model.subgraphs[0]
        self.op_name = [
            names.get(
                max(
                    model.operatorCodes[op.opcodeIndex].builtinCode,
                    model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode,
                )
            )
            for op in self.graph.operators
        ]
        self.writer = {i: k for k, op in enumerate(self.graph.operators) for i in op.outputs}
        self.ends = set(self.graph.inputs) | set(self.graph.outputs)

    def params(self, i: int):
        q = self.graph.tensors[i].quantization
        if q is None or q.scale is None or len(q.scale) != 1 or self.graph.tensors[i].type != self.int8:
            return None  # not a per-tensor int8 activation
        return float(q.scale[0]), int(q.zeroPoint[0])

    def group(self, i: int) -> list[int] | None:
        """`i` and the tensors tied to it through the same-scale ops that write it (their input
        has the same parameters), back to a tensor that a free-scale op writes; None where the
        chain ends anywhere else (a graph input, an op with a fixed output scale)."""
        out = [i]
        while True:
            k = self.writer.get(out[-1])
            if k is None or out[-1] in self.ends:
                return None
            name = self.op_name[k]
            if name in _FREE_SCALE:
                return out
            source = self.graph.operators[k].inputs[0]
            if name not in _SAME_SCALE or self.params(source) != self.params(out[-1]):
                return None
            out.append(source)

    def candidates(self) -> dict[int, str]:
        """Tensor index -> the in-place op reading it: the per-tensor int8 inputs of ADD/SUB/MUL
        that other ops write (graph inputs and outputs excluded)."""
        out = {}
        for k, op in enumerate(self.graph.operators):
            if self.op_name[k] in _IN_PLACE:
                for i in op.inputs:
                    if i >= 0 and i in self.writer and i not in self.ends and self.params(i) is not None:
                        out[i] = self.op_name[k]
        return out


def _float_ranges(float_tflite: bytes, names: set[str], calibration: np.ndarray, batch: int) -> dict:
    """name -> (min, max) of those tensors of the float32 file over the calibration images, in
    batches of `batch` as the converter calibrates."""
    from tfsubspace.edge.diagnose import _interpreter

    it = _interpreter(float_tflite)  # all tensors preserved: no buffer is shared, each keeps its own values
    index = {d["name"]: d["index"] for d in it.get_tensor_details() if d["name"] in names}
    source = it.get_input_details()[0]["index"]
    low = dict.fromkeys(index, np.inf)
    high = dict.fromkeys(index, -np.inf)
    for start in range(0, len(calibration) - batch + 1, batch):
        it.set_tensor(source, np.asarray(calibration[start : start + batch], np.float32))
        it.invoke()
        for name, i in index.items():
            values = it.get_tensor(i)
            low[name], high[name] = min(low[name], float(values.min())), max(high[name], float(values.max()))
    return {name: (low[name], high[name]) for name in index if np.isfinite(low[name])}


def repair_shared_ranges(
    int8_tflite: bytes, float_tflite: bytes | Callable[[], bytes], calibration: np.ndarray
) -> tuple[bytes, list[Repair]]:
    """(the int8 file with the ranges of the in-place ops' inputs repaired, what was repaired).

    A tensor tied to its input by a same-scale op (a max-pooling before a residual ADD) is
    repaired with that input, both to the union of their own ranges. The repaired file must load
    in the LiteRT runtime (XNNPACK included); where it does not, the converter's file is returned
    and the reason logged.

    Args:
        int8_tflite: a full-int8 file, as the converter wrote it.
        float_tflite: the float32 file of the same model and batch size (same tensor names), or a
            function that converts it, called only when the int8 file has a tensor to measure.
        calibration: the images the int8 file was calibrated on.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    from tfsubspace.edge.runtime import TFLiteRunner
    from tfsubspace.errors import TfSubspaceError

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(int8_tflite))
    g = _Graph(model)
    groups = {i: (op, g.group(i)) for i, op in g.candidates().items()}
    groups = {i: (op, group) for i, (op, group) in groups.items() if group is not None}
    if not groups:
        return int8_tflite, []
    tensors = g.graph.tensors
    name = {i: tensors[i].name.decode() for _, group in groups.values() for i in group}
    batch = int(tensors[g.graph.inputs[0]].shape[0]) or 1
    if callable(float_tflite):
        float_tflite = float_tflite()
    own = _float_ranges(float_tflite, set(name.values()), calibration, batch)
    repairs = []
    for i, (op, group) in groups.items():
        if any(name[j] not in own for j in group):
            continue
        low, high = min(own[name[j]][0] for j in group), max(own[name[j]][1] for j in group)
        scale, zero = int8_parameters(low, high)
        old_scale, old_zero = g.params(i)
        calibrated = _range(old_scale, old_zero)
        wider = calibrated[0] <= min(low, 0.0) + scale and calibrated[1] >= max(high, 0.0) - scale
        if high <= low or not wider or scale >= 0.999 * old_scale:
            continue  # its own range, or one this repair cannot explain: left as the converter made it
        for j in group:
            tensors[j].quantization.scale, tensors[j].quantization.zeroPoint = [scale], [zero]
        repairs.append(Repair(name[i], op, calibrated, _range(scale, zero)))
    if not repairs:
        return int8_tflite, []
    content = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    try:
        TFLiteRunner(content)
    except TfSubspaceError as e:
        log.warning("int8 ranges not repaired (%s): the repaired file does not load: %s", ISSUE, e)
        return int8_tflite, []
    finer = max((r.calibrated[1] - r.calibrated[0]) / (r.own[1] - r.own[0]) for r in repairs)
    log.info("int8: %d ranges repaired (%s), up to %.1fx finer", len(repairs), ISSUE, finer)
    for r in repairs:
        log.debug("int8 range repaired: %s", r.describe())
    return content, repairs
