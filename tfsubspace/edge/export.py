"""TFLite export: float32, float16, dynamic-range int8 and full int8, each checked.

`export(model, out_dir, calibration_ds=..., check_ds=...)` converts a Keras model with a fixed
batch size of 1 (static shapes: what the Edge TPU and TFLite Micro need, and what a phone runs),
writes each file atomically, and runs every file with the LiteRT interpreter against the Keras
model on the check images: max abs error of the outputs and top-1 agreement. A full-int8 file
whose agreement falls under `min_agreement` (99% unless given) is reported as failed, with what
to try. The agreement is measured on a sample: `ExportedModel.agreement_interval` is its 95%
interval over the check images, and a pass or failure that the interval does not settle (on
1,000 images, 99.0% is 98.2-99.5%) says so in its message.

Full int8 is automatic (autoint8.int8_steps): after the plain post-training file, the float
model is rewritten (BatchNormalization folding always; cross-layer equalization and bias
correction while no file passes; in that order, each exact or measured) and converted again,
and the first rewritten file that passes is kept; the ExportedModel lists every step's agreement (`steps`) and, for a
failing plain file, where its error comes from (`diagnosis`, from diagnose.py).

Calibration and checks must use images in the range the model takes: a model that starts
with Rescaling(1/255) takes 0-255 pixels, and an int8 file calibrated on [0, 1] images clips
every real input above 1 while its check (on the same wrong images) still looks perfect.
export() refuses such data (InputRangeError); `input_range` states the range explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.data.inputs import images_of
from tfsubspace.edge import autoint8
from tfsubspace.edge.convert import DEFAULT_MODES, MODES, convert, with_batch_size
from tfsubspace.edge.input_range import check_input_range
from tfsubspace.edge.runtime import TFLiteRunner
from tfsubspace.errors import TfSubspaceError


@dataclasses.dataclass
class ExportedModel:
    """One exported file and its check against the Keras model."""

    mode: str
    path: Path
    size_bytes: int
    max_abs_error: float
    agreement: float
    examples: int
    passed: bool
    message: str = ""
    steps: list = dataclasses.field(default_factory=list)  # int8: every step tried (autoint8)
    diagnosis: list = dataclasses.field(default_factory=list)  # int8: findings of a failing file

    @property
    def agreement_interval(self) -> tuple[float, float]:
        """The 95% interval of `agreement` over the `examples` check images (autoint8.agreement_interval)."""
        return autoint8.agreement_interval(self.agreement, self.examples)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["agreement_interval"] = list(self.agreement_interval)
        return out


def _images(ds, limit: int | None):
    """Numpy images (float32) from a dataset (or list) of batches of images or of (images,
    labels), or from an array of images (N, H, W, C) or an (images, labels) tuple of arrays."""
    if isinstance(ds, tuple) and len(ds) == 2 and hasattr(ds[0], "ndim"):  # a list is a list of batches
        ds = ds[0]
    if hasattr(ds, "ndim"):  # one array of images: iterating it would yield single images
        images = np.asarray(ds, np.float32)
        if not len(images):
            raise TfSubspaceError("The images for calibration/checks are empty.")
        return images[:limit] if limit is not None else images
    out, n = [], 0
    for batch in ds:
        x = images_of(batch)
        x = keras.ops.convert_to_numpy(x).astype(np.float32)
        out.append(x)
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not out:
        raise TfSubspaceError("The data set for calibration/checks is empty.")
    images = np.concatenate(out)
    return images[:limit] if limit is not None else images


def check(tflite: bytes | str | os.PathLike, model: keras.Model, images: np.ndarray) -> tuple[float, float]:
    """(max abs error of the outputs, top-1 agreement) of a TFLite file against `model`."""
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    got = TFLiteRunner(tflite)(images)
    return float(np.max(np.abs(expected - got))), float(np.mean(expected.argmax(-1) == got.argmax(-1)))


def export(
    model: keras.Model,
    out_dir: str | os.PathLike,
    *,
    modes=DEFAULT_MODES,
    calibration_ds=None,
    check_ds=None,
    calibration_examples: int = 300,
    check_examples: int = 1000,
    min_agreement: float = autoint8.DEFAULT_MIN_AGREEMENT,
    io_dtype: str = "int8",
    name: str | None = None,
    batch_size: int = 1,
    input_range: str | None = None,
    int8_fixes=autoint8.FIXES,
    diagnose_failures: bool = True,
) -> list[ExportedModel]:
    """Exports `model` to `out_dir`/NAME_MODE.tflite for each mode and checks each file.

    Args:
        calibration_ds: batches of images (or (images, labels)), or an array of images
            (N, H, W, C), for int8 calibration, in the range the model takes (0-255 for a
            model that starts with Rescaling(1/255)).
        check_ds: images for the checks (defaults to calibration_ds), in the same range.
        check_examples: how many of them to check on: 99% measured on 1,000 images is 98.2-99.5%
            (95% interval, ExportedModel.agreement_interval), on 500 images 97.7-99.6%.
        min_agreement: top-1 agreement with the Keras model below which a quantized file fails.
        batch_size: the files' fixed input batch (1 for microcontrollers and the Edge TPU;
            files of other batch sizes are named NAME_MODE_bBATCH.tflite).
        input_range: None (guess, see check_input_range), "0-1" or "0-255": the pixel range
            the model takes, which both data sets must be in.
        int8_fixes: the float rewrites full int8 may try, in autoint8.FIXES order, when the
            plain file fails its check (() for plain post-training int8 only).
        diagnose_failures: add per-tensor findings (diagnose.py) of a failing plain int8 file.
    Returns:
        One ExportedModel per mode; a failed int8 file is still written, marked failed.
    Raises:
        InputRangeError: the images are not in the range the model takes.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1]. Received: min_agreement={min_agreement}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"Unknown export mode {mode!r}; expected one of {MODES}.")
    check_ds = check_ds if check_ds is not None else calibration_ds
    if check_ds is None:
        raise ValueError("export() needs check_ds (or calibration_ds): every file is checked against the model.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
    fixed = with_batch_size(model, batch_size)
    calibration = _images(calibration_ds, calibration_examples) if calibration_ds is not None else None
    images = _images(check_ds, check_examples)
    if calibration is not None:
        check_input_range(model, calibration, input_range, "the calibration images (calibration_ds)")
    check_input_range(model, images, input_range, "the check images (check_ds)")
    out_dir = Path(out_dir)
    name = name or model.name
    results = []
    for mode in modes:
        suffix = "" if batch_size == 1 else f"_b{batch_size}"
        if mode == "int8":
            results.append(
                _export_int8(
                    model,
                    out_dir / f"{name}_{mode}{suffix}.tflite",
                    calibration,
                    images,
                    fixes=int8_fixes,
                    min_agreement=min_agreement,
                    batch_size=batch_size,
                    io_dtype=io_dtype,
                    diagnose_failures=diagnose_failures,
                )
            )
            continue
        content = convert(fixed, mode, calibration=calibration, io_dtype=io_dtype)
        path = fileio.write_bytes(out_dir / f"{name}_{mode}{suffix}.tflite", content)
        error, agreement = check(content, model, images)
        passed = agreement >= min_agreement
        message = "" if passed else _failure_message(agreement, min_agreement)
        message = (message + autoint8.verdict_note(agreement, len(images), min_agreement)).strip()
        results.append(ExportedModel(mode, path, len(content), error, agreement, len(images), passed, message))
    return results


def _failure_message(agreement: float, min_agreement: float, tried: str = "") -> str:
    return (
        f"top-1 agreement with the Keras model is {agreement:.2%}, under {min_agreement:.0%}{tried}: "
        "calibrate on more (and more varied) images, export int16x8 (16-bit activations, int8 weights: "
        "TFLite Micro runs it, LiteRT's XNNPACK does not), or use quantization-aware training "
        "(scripts/export_tflite.py --qat needs the tfmot extra)."
    )


def _near_ties(step) -> str:
    """A sentence on the disagreements that are near ties of an unsure model, where most are."""
    if not step.disagreements or step.near_ties <= step.disagreements / 2:
        return ""
    return (
        f" {step.near_ties} of its {step.disagreements} disagreements are near ties: images where the Keras model's "
        f"top-2 margin is under the int8 file's error there (median margin on the check images "
        f"{step.median_margin:.3g}). The model is unsure there, so any rounding flips them; images of its own "
        "domain, where it is surer, measure the file better."
    )


def _export_int8(model, path, calibration, images, *, fixes, min_agreement, batch_size, io_dtype, diagnose_failures):
    """The full-int8 file: the first automatic step that passes, else the best one, checked."""
    if calibration is None or not len(calibration):
        raise ValueError("Full int8 export needs calibration images (a representative data set).")
    steps = autoint8.int8_steps(
        model, calibration, images, fixes=fixes, min_agreement=min_agreement, batch_size=batch_size, io_dtype=io_dtype
    )
    chosen = autoint8.best(steps)
    path = fileio.write_bytes(path, chosen.content)
    findings = []
    if diagnose_failures and not steps[0].passed:
        from tfsubspace.edge import diagnose

        findings = [f"plain: {line}" for line in diagnose.diagnose(steps[0].content, model, images).findings()]
        if not chosen.passed and chosen is not steps[0]:
            kept = diagnose.diagnose(chosen.content, chosen.model, images).findings()
            findings += [f"{chosen.name}: {line}" for line in kept]
    message = ""
    if not chosen.passed:
        tried = f" after {', '.join(s.name for s in steps[1:])}" if len(steps) > 1 else ""
        message = _failure_message(chosen.agreement, min_agreement, tried) + _near_ties(chosen)
    elif chosen.name != "plain":
        message = f"plain int8 agreed {steps[0].agreement:.2%}; the {chosen.name} step reached {chosen.agreement:.2%}."
    message = (message + autoint8.verdict_note(chosen.agreement, len(images), min_agreement)).strip()
    return ExportedModel(
        "int8",
        path,
        len(chosen.content),
        chosen.max_abs_error,
        chosen.agreement,
        len(images),
        chosen.passed,
        message,
        steps=[s.summary() for s in steps],
        diagnosis=findings,
    )
