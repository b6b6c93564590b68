"""Full int8 that keeps the model's function: plain post-training int8, then fixes in order.

`int8_steps(model, calibration, check)` converts the model to full int8 as it is ("plain"),
then again after each float rewrite in FIXES, each on top of the previous ones:
- "fold": BatchNormalization folding (fold.py), its scale moved before the int8 activation
  tensor where a ReLU allows it. Folding is exact and leaves fewer tensors to round, so it
  always runs, and its file is kept over a plain one when both pass (on the benchmark's test
  models it never lost agreement: benchmarks/results/int8.md);
- "equalize": cross-layer equalization of each ReLU chain's activation ranges (equalize.py);
- "bias": empirical bias correction from the previous step's int8 file (biascorrect.py);
- "output": a classifier's logits clipped to where the calibration images' top classes fall, so
  that the int8 output's steps are finer (output_range.py; top-1 kept, softmax probabilities
  within about 4e-4, the logits themselves cut at both ends).
After folding it stops at the first file whose top-1 agreement with the model on the check
images reaches `min_agreement` (DEFAULT_MIN_AGREEMENT, 99%), or runs them all
(`stop_at_pass=False`). Every rewrite is checked against the original float model (max abs
difference of the outputs on the check images) and refused (RewriteError) when it changes the
function more than `rewrite_tolerance` relative to the outputs' range; bias correction and
the output clip change it on purpose and are exempt. Each step reports its agreement, the time
its rewrite took, and what it did, so a failing file says how far each fix got. Quantization-aware
training (qat.py) stays the last resort.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import keras
import numpy as np

from tfsubspace.edge import biascorrect, equalize, fold, output_range
from tfsubspace.edge.convert import convert, with_batch_size
from tfsubspace.edge.graphedit import RewriteError, predict
from tfsubspace.edge.runtime import TFLiteRunner

log = logging.getLogger(__name__)

FIXES = ("fold", "equalize", "bias", "output")
DEFAULT_MIN_AGREEMENT = 0.99  # top-1 agreement with the float model below which a quantized file fails


@dataclasses.dataclass
class Int8Step:
    """One full-int8 file of the automatic export and its check against the float model."""

    name: str  # "plain" or the last fix applied
    content: bytes
    agreement: float
    max_abs_error: float
    passed: bool
    rewrite_seconds: float = 0.0  # time of this step's float rewrite
    float_max_abs_diff: float = 0.0  # the rewritten float model against the original
    notes: list = dataclasses.field(default_factory=list)
    model: object = None  # the rewritten float model
    disagreements: int = 0  # check images whose top-1 differs from the float model's
    near_ties: int = 0  # of those, the images whose float top-2 margin is under the int8 error there
    median_margin: float | None = None  # the float model's median top-2 margin on the check images

    def summary(self) -> dict:
        return {
            "step": self.name,
            "agreement": self.agreement,
            "max_abs_error": self.max_abs_error,
            "passed": self.passed,
            "size_bytes": len(self.content),
            "rewrite_seconds": self.rewrite_seconds,
            "float_max_abs_diff": self.float_max_abs_diff,
            "notes": list(self.notes),
            "disagreements": self.disagreements,
            "near_ties": self.near_ties,
            "median_margin": self.median_margin,
        }


def agreement_interval(agreement: float, examples: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of a top-1 agreement measured on `examples`
    images: where the agreement on other images like them is likely to lie. On 1,000 images an
    agreement of 99.0% is 98.2-99.5%: a file that passes 99% by a few images may not."""
    if examples <= 0:
        return 0.0, 1.0
    n, p = float(examples), min(max(float(agreement), 0.0), 1.0)
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, center - half), min(1.0, center + half)


def verdict_note(agreement: float, examples: int, min_agreement: float) -> str:
    """A sentence for a pass or a failure that the check images cannot settle (the 95% interval
    of the agreement includes `min_agreement`), else ""."""
    low, high = agreement_interval(agreement, examples)
    passed = agreement >= min_agreement
    if (low >= min_agreement) if passed else (high < min_agreement):
        return ""
    return (
        f" On {examples} check images its agreement is {low:.2%}-{high:.2%} (95% interval), a range that includes "
        f"{min_agreement:.0%}: check on more images (check_examples) to tell whether it "
        + ("passes." if passed else "fails.")
    )


def tie_margins(expected: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the float outputs' top-2 margin and the int8 outputs' largest error. An image
    whose margin is under its error is a near tie: the float model is unsure there, and
    rounding alone may flip its top-1."""
    top2 = np.sort(expected, -1)
    return top2[..., -1] - top2[..., -2], np.abs(expected - got).max(-1)


def _check(content: bytes, expected: np.ndarray, images: np.ndarray) -> dict:
    got = TFLiteRunner(content)(images)
    differ = expected.argmax(-1) != got.argmax(-1)
    found = {
        "max_abs_error": float(np.max(np.abs(expected - got))),
        "agreement": float(1 - np.mean(differ)),
        "disagreements": int(differ.sum()),
    }
    if expected.shape[-1] > 1:  # one output unit has no top-2
        margin, error = tie_margins(expected, got)
        found.update(near_ties=int(np.sum(differ & (margin < error))), median_margin=float(np.median(margin)))
    return found


def int8_step(
    name: str,
    model: keras.Model,
    expected: np.ndarray,
    calibration: np.ndarray,
    check: np.ndarray,
    *,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    batch_size: int = 1,
    io_dtype: str = "int8",
    rewrite_seconds: float = 0.0,
    float_max_abs_diff: float = 0.0,
    notes=(),
) -> Int8Step:
    """The post-training full-int8 file of `model` (calibrated on `calibration`), checked against
    `expected`, the outputs of the original float model on `check`."""
    content = convert(with_batch_size(model, batch_size), "int8", calibration=calibration, io_dtype=io_dtype)
    found = _check(content, expected, check)  # agreement, max_abs_error and the near ties, by field name
    step = Int8Step(
        name,
        content,
        passed=found["agreement"] >= min_agreement,
        rewrite_seconds=rewrite_seconds,
        float_max_abs_diff=float_max_abs_diff,
        notes=list(notes),
        model=model,
        **found,
    )
    log.info("int8 %-9s agreement %.2f%% (rewrite %.1f s)", name, 100 * step.agreement, rewrite_seconds)
    return step


def int8_steps(
    model: keras.Model,
    calibration: np.ndarray,
    check: np.ndarray,
    *,
    fixes=FIXES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    batch_size: int = 1,
    io_dtype: str = "int8",
    stop_at_pass: bool = True,
    rewrite_tolerance: float = 1e-4,
) -> list[Int8Step]:
    """The plain int8 file, then one per fix in `fixes` (in FIXES order): folding always, the
    others while no file has passed.

    Args:
        calibration: float32 images for int8 calibration and for the rewrites' statistics.
        check: float32 images for the agreement check (held out from calibration, ideally).
        rewrite_tolerance: largest max abs difference of an exact rewrite's outputs from the
            model's, relative to the largest |output|.
    """
    unknown = [f for f in fixes if f not in FIXES]
    if unknown:
        raise ValueError(f"Unknown int8 fixes {unknown}; expected some of {FIXES}.")
    expected = predict(model, check)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    steps = []

    def add(name, current, seconds=0.0, notes=(), diff=0.0):
        step = int8_step(
            name,
            current,
            expected,
            calibration,
            check,
            min_agreement=min_agreement,
            batch_size=batch_size,
            io_dtype=io_dtype,
            rewrite_seconds=seconds,
            float_max_abs_diff=diff,
            notes=notes,
        )
        steps.append(step)
        return step

    add("plain", model)
    current = model
    for fix in [f for f in FIXES if f in fixes]:
        if stop_at_pass and fix != "fold" and any(s.passed for s in steps):
            break
        start = time.perf_counter()
        if fix == "fold":
            current, notes = fold.fold_batchnorm(current)
        elif fix == "equalize":
            current, notes = equalize.equalize(current, calibration)
        elif fix == "bias":
            current, notes = biascorrect.correct_biases(current, steps[-1].content, calibration)
        else:
            current, notes = output_range.narrow_output(current, calibration)
        seconds = time.perf_counter() - start
        diff = float(np.max(np.abs(predict(current, check) - expected)))
        if fix in ("fold", "equalize") and diff > rewrite_tolerance * scale:
            raise RewriteError(
                f"The {fix} rewrite of {model.name!r} changed its outputs by up to {diff:.3g} "
                f"(outputs up to {scale:.3g}): it should be exact. Steps: {notes}"
            )
        add(fix, current, seconds, notes, diff)
    return steps


def best(steps: list[Int8Step]) -> Int8Step:
    """The file the export keeps: the first step after plain that passed (plain is the baseline
    once an exact fold has run), plain where it alone ran and passed, else the step of highest
    agreement (the earliest of equals)."""
    candidates = steps[1:] or steps
    return next((s for s in candidates if s.passed), None) or max(steps, key=lambda s: s.agreement)


def format_steps(steps: list[Int8Step]) -> str:
    """A text table of the steps: agreement, rewrite time, float difference, size."""
    return format_step_rows([s.summary() for s in steps])


def format_step_rows(rows: list[dict]) -> str:
    """format_steps of Int8Step.summary() rows (as ExportedModel.steps holds them)."""
    lines = [f"{'int8 step':<10} {'agreement':>10} {'rewrite':>9} {'float diff':>11} {'size':>10}"]
    for r in rows:
        lines.append(
            f"{r['step']:<10} {r['agreement']:>10.2%} {r['rewrite_seconds']:>8.1f}s {r['float_max_abs_diff']:>11.2g} "
            f"{r['size_bytes'] / 1024:>8.1f}KiB" + ("  passed" if r["passed"] else "")
        )
    return "\n".join(lines)
