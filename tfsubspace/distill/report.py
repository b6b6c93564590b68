"""What a compression reports: top-1 accuracy and agreement with the teacher on a data set,
and the Markdown summary of a compress() report."""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.data import inputs
from tfsubspace.errors import TfSubspaceError
from tfsubspace.prune import surgery


def _classes(model: keras.Model) -> int:
    return int(model.outputs[0].shape[-1])


def evaluate(model: keras.Model, ds, teacher: keras.Model | None = None) -> dict:
    """Top-1 accuracy (batches with labels: class indices or one-hot) and agreement with
    `teacher` (if given)."""
    correct = agree = total = 0
    labeled = False
    for batch in ds:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        pred = np.argmax(keras.ops.convert_to_numpy(model(x, training=False)), axis=-1)
        total += len(pred)
        if y is not None:
            labeled = True
            correct += int(np.sum(pred == inputs.labels_to_sparse(y, _classes(model))))
        if teacher is not None:
            agree += int(np.sum(pred == np.argmax(keras.ops.convert_to_numpy(teacher(x, training=False)), axis=-1)))
    if total == 0:
        raise TfSubspaceError("The evaluation data set is empty.")
    out = {"examples": total}
    if labeled:
        out["accuracy"] = correct / total
    if teacher is not None:
        out["agreement"] = agree / total
    return out


def format_report(report: dict) -> str:
    """Markdown: the before/after summary and the per-layer table of a compress() report."""
    t, s = report["teacher"], report["student"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"# Compression of {t['name']}",
        "",
        "| | teacher | student |",
        "|---|---:|---:|",
        f"| params | {t['params']:,} | {s['params']:,} ({pct(report['params_removed'])} removed) |",
        f"| MACs / image | {t['macs']:,} | {s['macs']:,} ({pct(report['macs_removed'])} removed) |",
    ]
    lat = report.get("latency", {})
    for how, values in (("estimated", lat), ("measured", lat.get("measured") or {})):
        if "student_ms" in values:
            lines.append(
                f"| float32 .tflite latency ({how} here) | {values['teacher_ms']:.4f} ms | "
                f"{values['student_ms']:.4f} ms ({values['speedup']:.2f}x faster) |"
            )
    if "accuracy" in s:
        lines.append(f"| accuracy | {pct(t.get('accuracy'))} | {pct(s.get('accuracy'))} |")
    if "agreement" in s:
        lines.append(f"| top-1 agreement with the teacher | | {pct(s['agreement'])} |")
    for name, b in report.get("budgets", {}).items():
        calibrated = f" (asked {b['asked']:,}, calibrated by timing the cut)" if "asked" in b else ""
        lines.append(f"| {name} budget | | {b['target']:,}{calibrated}: {'met' if b['met'] else 'NOT met'} |")
    for stage, log in report.get("agreement_in_training", {}).items():
        heldout = f", held out {pct(log['heldout'])}" if log.get("heldout") is not None else ""
        lines.append(f"| agreement in {stage} (last epoch) | | train {pct(log.get('train'))}{heldout} |")
    lines += ["", "## Widths per channel group", "", "| group | teacher | subspace | final |", "|---|---:|---:|---:|"]
    for g, w in report["widths"].items():
        narrowest = " (narrowest)" if w.get("subspace_at_min") else ""
        lines.append(f"| {g} | {w['teacher']} | {w['subspace']}{narrowest} | {w['final']} |")
    lines += ["", "## Layers", "", surgery.format_report(report["layers"])]
    return "\n".join(lines) + "\n"
