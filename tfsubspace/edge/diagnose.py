"""Where a full-int8 .tflite file loses its float model: per-tensor quantization error.

`diagnose(int8_file, model, images)` runs the int8 file and a float32 file of the same model
(converted here, same tensor names) side by side on the images, keeping every intermediate
tensor, and reports for each int8 activation tensor:
- its calibrated range (what int8 can hold: scale * (-128 - zero point) .. scale * (127 - zero point))
  and the range the float model really reaches there, and the share of float values outside
  the calibrated range (saturation);
- the error of the int8 tensor against the float one, relative to the float tensor's RMS
  (cumulative: it includes the error of every earlier layer) and its mean (a shift);
- how many channels span fewer than 4 int8 steps (channels starved by a per-tensor scale that
  a wider channel sets);
and for each constant multiplier of a MUL (the scale of an unfolded BatchNormalization), its
worst rounding error relative to the value: such a constant gets one int8 scale for all
channels, so a channel multiplied by 0.04 next to one multiplied by 30 keeps a wrong gain.
`format_diagnosis` prints it; `Diagnosis.findings` names the tensors that explain a failure, or,
where none does (no saturation, no starved channels, no large jump) but the output is still far
off, says that the error is rounding spread over many tensors: no range choice or exact rewrite
removes that, wider activations (16x8) or quantization-aware training do.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tfsubspace.errors import TfSubspaceError

_STARVED_STEPS = 4  # a channel that spans fewer int8 steps than this carries little information
_ELEMENTWISE = ("MUL",)  # constants whose relative rounding error is a per-channel gain error


@dataclasses.dataclass
class TensorError:
    """Quantization error of one activation tensor of an int8 file (see the module doc)."""

    index: int
    name: str
    op: str
    shape: list
    scale: float
    zero_point: int
    calibrated: tuple[float, float]
    observed: tuple[float, float]
    saturated: float  # share of the float values outside the calibrated range
    relative_error: float  # RMS(int8 - float) / RMS(float), cumulative
    added_error: float  # relative_error minus the largest relative_error of the op's inputs
    mean_error: float
    starved_channels: int
    channels: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ConstantError:
    """Rounding error of a constant multiplier (one int8 scale for all its values)."""

    name: str
    op: str
    size: int
    value_range: tuple[float, float]
    worst_relative_error: float  # max over values of |int8 - float| / |float|
    off_by_10pct: int  # values rounded by more than 10% of themselves

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Diagnosis:
    tensors: list[TensorError]
    constants: list[ConstantError]
    examples: int

    def findings(self, *, saturation: float = 1e-3, jump: float = 0.05) -> list[str]:
        """Short lines naming what goes wrong: saturated tensors, constants rounded by over 10%,
        and the layers that add the most error (over `jump` relative RMS); else, when the output's
        relative error is still over `jump`, a line saying it is rounding spread over the tensors."""
        out = []
        for t in self.tensors:
            if t.saturated > saturation:
                out.append(
                    f"{t.op} -> {_short(t.name)}: {t.saturated:.2%} of float values outside the calibrated range "
                    f"[{t.calibrated[0]:.3g}, {t.calibrated[1]:.3g}] (float reaches [{t.observed[0]:.3g}, "
                    f"{t.observed[1]:.3g}])"
                )
        for c in self.constants:
            if c.off_by_10pct:
                out.append(
                    f"{c.op} constant {_short(c.name)}: {c.off_by_10pct} of {c.size} values rounded by over 10% "
                    f"(worst {c.worst_relative_error:.0%}): one int8 scale for values in "
                    f"[{c.value_range[0]:.3g}, {c.value_range[1]:.3g}]"
                )
        for t in sorted(self.tensors, key=lambda t: -t.added_error)[:3]:
            if t.added_error > jump:
                starved = f", {t.starved_channels}/{t.channels} channels under {_STARVED_STEPS} steps"
                out.append(
                    f"{t.op} -> {_short(t.name)} adds {t.added_error:.1%} relative error (now {t.relative_error:.1%}"
                    f"{starved if t.starved_channels else ''})"
                )
        last = self.tensors[-1] if self.tensors else None
        if not out and last is not None and last.relative_error > jump:
            worst = max(t.added_error for t in self.tensors)
            starved = sum(t.starved_channels for t in self.tensors)
            out.append(
                f"no saturation, {starved} starved channels, no op adds over {jump:.0%}: the output's "
                f"{last.relative_error:.1%} relative error is rounding spread over {len(self.tensors)} int8 tensors "
                f"(the most one op adds: {worst:.1%}); int8 activations lack the resolution, not the range: "
                "int16 activations (16x8) or quantization-aware training, or a dynamic-range file"
            )
        return out

    def to_json(self) -> dict:
        return {
            "examples": self.examples,
            "tensors": [t.to_json() for t in self.tensors],
            "constants": [c.to_json() for c in self.constants],
            "findings": self.findings(),
        }


def _short(name: str, width: int = 48) -> str:
    name = name.split(";")[0]
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _interpreter(content: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_content=content,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    it.allocate_tensors()
    return it


def _dequantize(values: np.ndarray, detail) -> np.ndarray:
    if values.dtype == np.float32:
        return values
    scale, zero = detail["quantization"]
    return (values.astype(np.float32) - zero) * scale


class _Stats:
    """Streaming statistics of one tensor over the images."""

    def __init__(self, channels: int):
        self.n = 0
        self.sq_err = self.sum_err = self.sq_ref = 0.0
        self.outside = 0
        self.lo, self.hi = np.inf, -np.inf
        self.ch_lo = np.full(channels, np.inf)
        self.ch_hi = np.full(channels, -np.inf)

    def update(self, ref: np.ndarray, got: np.ndarray, calibrated, step):
        diff = got.astype(np.float64) - ref
        self.n += ref.size
        self.sq_err += float(np.sum(diff**2))
        self.sum_err += float(np.sum(diff))
        self.sq_ref += float(np.sum(ref.astype(np.float64) ** 2))
        self.outside += int(np.sum((ref < calibrated[0] - step / 2) | (ref > calibrated[1] + step / 2)))
        self.lo, self.hi = min(self.lo, float(ref.min())), max(self.hi, float(ref.max()))
        flat = ref.reshape(-1, ref.shape[-1])
        self.ch_lo = np.minimum(self.ch_lo, flat.min(0))
        self.ch_hi = np.maximum(self.ch_hi, flat.max(0))


def diagnose(
    int8: bytes | str | os.PathLike,
    model,
    images: np.ndarray,
    *,
    float_tflite: bytes | None = None,
    limit: int = 200,
) -> Diagnosis:
    """Per-tensor quantization error of a full-int8 file of `model` on `images` (see module doc).

    Args:
        int8: the full-int8 file (bytes or path), converted from `model` at a fixed batch.
        images: float32 images in the range the model takes (the first `limit` are used).
        float_tflite: a float32 file of the same model and batch (converted here if None).
    """
    from tfsubspace.edge.convert import convert, with_batch_size
    from tfsubspace.edge.runtime import _read_tflite

    content = int8 if isinstance(int8, bytes) else _read_tflite(int8)
    q = _interpreter(content)
    q_in = q.get_input_details()[0]
    batch = int(q_in["shape"][0]) or 1
    if float_tflite is None:
        float_tflite = convert(with_batch_size(model, batch), "float32")
    f = _interpreter(float_tflite)
    f_in = f.get_input_details()[0]
    f_index = {d["name"]: d for d in f.get_tensor_details()}
    q_details = q.get_tensor_details()
    producer = {}
    for op in q._get_ops_details():
        for out in op["outputs"]:
            producer[int(out)] = op
    constants = {int(i) for op in q._get_ops_details() for i in op["inputs"] if int(i) >= 0} - set(producer)
    activations = [
        d
        for d in q_details
        if d["index"] in producer
        and d["dtype"] in (np.int8, np.uint8)
        and d["name"] in f_index
        and tuple(f_index[d["name"]]["shape"]) == tuple(d["shape"])
    ]
    if not activations:
        raise TfSubspaceError("diagnose() found no int8 activation tensors to compare: is the file full int8?")
    stats = {d["index"]: _Stats(int(d["shape"][-1]) if len(d["shape"]) else 1) for d in activations}
    ranges = {}
    for d in activations:
        scale, zero = d["quantization"]
        info = np.iinfo(d["dtype"])
        ranges[d["index"]] = ((info.min - zero) * scale, (info.max - zero) * scale, scale)
    from tfsubspace.edge.runtime import _quantize

    n = min(limit, len(images)) // batch * batch
    if n == 0:
        raise ValueError(f"diagnose() needs at least {batch} images (the file's batch). Received: {len(images)}")
    for start in range(0, n, batch):
        chunk = images[start : start + batch].astype(np.float32)
        q.set_tensor(q_in["index"], _quantize(chunk, q_in))
        f.set_tensor(f_in["index"], chunk)
        q.invoke()
        f.invoke()
        for d in activations:
            ref = f.get_tensor(f_index[d["name"]]["index"])
            got = _dequantize(q.get_tensor(d["index"]), d)
            lo, hi, step = ranges[d["index"]]
            stats[d["index"]].update(ref, got, (lo, hi), step)
    tensors, relative = [], {}
    for d in activations:
        s, (lo, hi, step) = stats[d["index"]], ranges[d["index"]]
        rel = float(np.sqrt(s.sq_err / max(s.sq_ref, 1e-30)))
        relative[d["index"]] = rel
        op = producer[d["index"]]
        before = max((relative.get(int(i), 0.0) for i in op["inputs"] if int(i) >= 0), default=0.0)
        tensors.append(
            TensorError(
                index=int(d["index"]),
                name=d["name"],
                op=op["op_name"],
                shape=[int(v) for v in d["shape"]],
                scale=float(step),
                zero_point=int(d["quantization"][1]),
                calibrated=(float(lo), float(hi)),
                observed=(s.lo, s.hi),
                saturated=s.outside / max(s.n, 1),
                relative_error=rel,
                added_error=rel - before,
                mean_error=s.sum_err / max(s.n, 1),
                starved_channels=int(np.sum(s.ch_hi - s.ch_lo < _STARVED_STEPS * step)),
                channels=len(s.ch_lo),
            )
        )
    tensors.sort(key=lambda t: _order(q, t.index))
    return Diagnosis(tensors, _constant_errors(q, f, f_index, constants), n)


def _order(interpreter, index: int) -> int:
    for i, op in enumerate(interpreter._get_ops_details()):
        if index in [int(o) for o in op["outputs"]]:
            return i
    return -1


def _constant_errors(q, f, f_index, constants) -> list[ConstantError]:
    out = []
    details = {d["index"]: d for d in q.get_tensor_details()}
    for op in q._get_ops_details():
        if op["op_name"] not in _ELEMENTWISE:
            continue
        for i in (int(i) for i in op["inputs"]):
            d = details.get(i)
            if i not in constants or d is None or d["dtype"] not in (np.int8, np.uint8) or d["name"] not in f_index:
                continue
            ref = f.get_tensor(f_index[d["name"]]["index"]).astype(np.float64)
            got = _dequantize(q.get_tensor(i), d).astype(np.float64)
            if ref.shape != got.shape or not ref.size:
                continue
            rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
            out.append(
                ConstantError(
                    name=d["name"],
                    op=op["op_name"],
                    size=int(ref.size),
                    value_range=(float(ref.min()), float(ref.max())),
                    worst_relative_error=float(rel.max()),
                    off_by_10pct=int(np.sum(rel > 0.1)),
                )
            )
    return out


def format_diagnosis(diagnosis: Diagnosis, *, rows: int | None = None) -> str:
    """A text table of the tensors (in op order) and the findings."""
    lines = [
        f"Per-tensor int8 error on {diagnosis.examples} images (relative RMS error is cumulative; "
        "'added' is what the op adds to its inputs' error):",
        f"{'op':<17} {'tensor':<48} {'calibrated':>19} {'float range':>19} {'satur.':>7} {'rel.err':>8} "
        f"{'added':>7} {'starved':>8}",
    ]
    for t in diagnosis.tensors[:rows]:
        lines.append(
            f"{t.op:<17} {_short(t.name):<48} {t.calibrated[0]:>9.3g},{t.calibrated[1]:<9.3g} "
            f"{t.observed[0]:>9.3g},{t.observed[1]:<9.3g} {t.saturated:>7.2%} {t.relative_error:>8.1%} "
            f"{t.added_error:>+7.1%} {t.starved_channels:>4}/{t.channels:<4}"
        )
    findings = diagnosis.findings()
    lines.append("Findings:" if findings else "Findings: no saturation, no badly rounded constants, no large jumps.")
    lines += [f"  - {line}" for line in findings]
    return "\n".join(lines)
