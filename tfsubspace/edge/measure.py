"""Edge benchmark of .tflite files: size, LiteRT latency, TFLite Micro arena, accuracy.

`benchmark(entries, ...)` measures every file in one run, so that the teacher/student
speed-up is a ratio measured side by side on the same machine. Latency is the wall time of
`Interpreter.invoke()` on one image with the stated thread count, after warm-up runs:
median, p90, min and max over the timed runs. Accuracy is top-1 on labeled images, and
agreement is top-1 agreement with a reference Keras model (the teacher), when given. Like
export's checks, the images must be in the range the models take (0-255 for a model that
starts with Rescaling(1/255)), else accuracy measures clipped inputs: benchmark() refuses them.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from tfsubspace import fileio
from tfsubspace.edge.input_range import check_input_range
from tfsubspace.edge.micro import micro_arena_bytes
from tfsubspace.edge.runtime import TFLiteRunner


@dataclasses.dataclass
class BenchEntry:
    """A .tflite file to measure, with a label, its mode and (optionally) its Keras source."""

    label: str
    path: Path
    mode: str
    keras_model: object = None  # for params and MACs


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def measure_latency(path, *, threads: int = 1, warmup: int = 10, runs: int = 100) -> dict:
    """Latency of one invoke (ms): median, p90, min, max, with the settings that produced it."""
    if warmup < 0 or runs < 1 or threads < 1:
        raise ValueError(f"Need warmup >= 0, runs >= 1, threads >= 1. Received: {warmup}, {runs}, {threads}")
    runner = TFLiteRunner(path, threads=threads)
    detail = runner.input
    runner.interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    for _ in range(warmup):
        runner.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "p90_ms": _percentile(times, 90),
        "min_ms": min(times),
        "max_ms": max(times),
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
    }


def _accuracy(path, images, labels, reference_logits):
    logits = TFLiteRunner(path)(images)
    pred = logits.argmax(-1)
    out = {}
    if labels is not None:
        out["accuracy"] = float(np.mean(pred == labels))
    if reference_logits is not None:
        out["agreement"] = float(np.mean(pred == reference_logits.argmax(-1)))
    return out


def benchmark(
    entries: list[BenchEntry],
    *,
    eval_ds=None,
    eval_examples: int = 1000,
    reference=None,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 100,
    micro: bool = True,
    input_range: str | None = None,
) -> dict:
    """Measures every entry; returns {"machine", "settings", "rows"} (rows in entry order).

    Args:
        eval_ds: images or (images, labels) for accuracy/agreement (first `eval_examples`).
        reference: a Keras model whose top-1 answers define agreement (e.g. the teacher).
        micro: measure the TFLite Micro arena of float32 and int8 files.
        input_range: None (guess), "0-1" or "0-255": the pixel range of eval_ds, checked
            against `reference` and every entry's Keras model (check_input_range).
    """
    import keras

    from tfsubspace.models import stats

    images = labels = reference_logits = None
    if eval_ds is not None:
        xs, ys = [], []
        for batch in eval_ds:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            xs.append(keras.ops.convert_to_numpy(x))
            if y is not None:
                ys.append(keras.ops.convert_to_numpy(y))
            if sum(len(a) for a in xs) >= eval_examples:
                break
        images = np.concatenate(xs)[:eval_examples].astype(np.float32)
        labels = np.concatenate(ys)[:eval_examples] if ys else None
        models = {id(m): m for m in [reference] + [e.keras_model for e in entries] if m is not None}
        for model in models.values():
            check_input_range(model, images, input_range, "the evaluation images (eval_ds)")
        if reference is not None:
            reference_logits = keras.ops.convert_to_numpy(reference.predict(images, batch_size=256, verbose=0))
    load_before = os.getloadavg()
    rows = []
    for entry in entries:
        row = {
            "label": entry.label,
            "mode": entry.mode,
            "file": str(entry.path),
            "size_bytes": os.path.getsize(entry.path),
            "batch": TFLiteRunner(entry.path).batch_size,
        }
        if entry.keras_model is not None:
            row["params"] = stats.count_params(entry.keras_model)
            row["macs"] = stats.count_macs(entry.keras_model)
        row["latency"] = measure_latency(entry.path, threads=threads, warmup=warmup, runs=runs)
        row["latency"]["per_image_ms"] = row["latency"]["median_ms"] / row["batch"]
        if micro and entry.mode in ("float32", "int8") and row["batch"] == 1:
            row["micro_arena_bytes"] = micro_arena_bytes(entry.path)
        if images is not None:
            row.update(_accuracy(entry.path, images, labels, reference_logits))
            row["eval_examples"] = len(images)
        rows.append(row)
    _speedups(rows)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "settings": {"threads": threads, "warmup": warmup, "runs": runs, "interpreter": "ai_edge_litert"},
        "load_average_before": [round(v, 2) for v in load_before],
        "rows": rows,
    }


def _speedups(rows):
    """Latency ratio of each row to the first row of the same mode and batch (the baseline, e.g.
    the teacher)."""
    first = {}
    for row in rows:
        base = first.setdefault((row["mode"], row.get("batch", 1)), row)
        row["speedup_vs_first"] = base["latency"]["median_ms"] / row["latency"]["median_ms"]


def format_table(report: dict) -> str:
    """A Markdown table of a benchmark() report."""
    s = report["settings"]
    lines = [
        f"LiteRT interpreter, {s['threads']} thread(s), {s['warmup']} warm-up and {s['runs']} timed invokes "
        f"(one batch each); machine: {report['machine']}; load average before the run "
        f"{', '.join(str(v) for v in report.get('load_average_before', []))}.",
        "",
        "| model | mode | batch | params | MACs | file | latency median (p90) | per image | speed-up | MCU arena "
        "| accuracy | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lat = r["latency"]
        count = lambda k: f"{r[k]:,}" if k in r else "-"
        pct = lambda k: f"{100 * r[k]:.2f}%" if k in r else "-"
        arena = f"{r['micro_arena_bytes'] / 1024:.1f} KiB" if "micro_arena_bytes" in r else "-"
        lines.append(
            f"| {r['label']} | {r['mode']} | {r.get('batch', 1)} | {count('params')} | {count('macs')} | "
            f"{r['size_bytes'] / 1024:.1f} KiB | {lat['median_ms']:.3f} ms ({lat['p90_ms']:.3f}) | "
            f"{lat.get('per_image_ms', lat['median_ms']):.4f} ms | {r['speedup_vs_first']:.2f}x | {arena} | "
            f"{pct('accuracy')} | {pct('agreement')} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots: file size vs accuracy and latency vs accuracy, one marker per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if any("accuracy" in r for r in report["rows"]) else "agreement"
    rows = [r for r in report["rows"] if key in r]
    paths = []
    for name, xlabel, xvalue in (
        ("size_vs_accuracy.png", "file size (KiB)", lambda r: r["size_bytes"] / 1024),
        ("latency_vs_accuracy.png", "median latency (ms)", lambda r: r["latency"]["median_ms"]),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in dict.fromkeys(r["mode"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode]
            ax.scatter([xvalue(r) for r in sel], [100 * r[key] for r in sel], label=mode)
            for r in sel:
                ax.annotate(
                    r["label"], (xvalue(r), 100 * r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(f"{key.capitalize()} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / name
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
