"""How well a measured latency table predicts the LiteRT latency of pruned models.

    python benchmarks/latency_table.py

For each model (random weights; only the architecture matters), measures its latency table
on this machine (`LatencyTable.measure`, 1 thread, cached as compress() caches it), builds
slim models by surgery at uniform widths (16 and 17 channels per group: at and just over
the SIMD multiple) and at random widths (30-90% of each group), exports each as float32 at
batch 1, and times them all with the teacher in interleaved rounds. For each slim model:
the table's estimate, the measured latency, and a MAC-proportional estimate
(teacher latency x MAC ratio) for comparison.
Results: benchmarks/results/latency_table.json and .md.
"""

import contextlib
import io
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["small_cnn", "vgg16_w0.25", "wrn_16_4"], "Models to measure.")
_RANDOM = flags.DEFINE_integer("random_plans", 3, "Random-width plans per model.", lower_bound=0)
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds over the files.", lower_bound=1)
_RUNS = flags.DEFINE_integer("runs", 100, "Invokes per file and round; a file's latency is its fastest.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random plans.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where latency_table.json and .md go.")


def _build(name):
    import keras

    from tfsubspace import models

    if name == "small_cnn":
        inputs = keras.Input((16, 16, 3))
        x = inputs
        for i, filters in enumerate((32, 32, 64, 64)):
            x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.ReLU(name=f"relu{i}")(x)
            if i == 1:
                x = keras.layers.MaxPooling2D(name="pool")(x)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="small_cnn")
    if name == "vgg16_w0.25":
        return models.build("vgg16", (28, 28, 1), 10, width=0.25)
    if name == "wrn_16_4":
        return models.build("wrn", (28, 28, 1), 10, depth=16, widen_factor=4)
    raise app.UsageError(f"--models: unknown model {name!r}; known: small_cnn, vgg16_w0.25, wrn_16_4")


def _rows(name, rng):
    from tfsubspace.edge import latency
    from tfsubspace.edge.convert import convert, with_batch_size
    from tfsubspace.edge.latency import LatencyTable
    from tfsubspace.models import stats
    from tfsubspace.prune import analysis, surgery
    from tfsubspace.prune.plan import PruningPlan

    model = _build(name)
    table = LatencyTable.measure(model, progress=True)
    an = analysis.analyze(model)
    sizes = {g: grp.size for g, grp in an.groups.items() if grp.prunable}
    plans = {
        "16 each": {g: min(16, n) for g, n in sizes.items()},
        "17 each": {g: min(17, n) for g, n in sizes.items()},
    }
    for i in range(_RANDOM.value):
        plans[f"random {i + 1}"] = {g: max(1, int(round(n * rng.uniform(0.3, 0.9)))) for g, n in sizes.items()}
    slims = {}
    for plan_name, keep in plans.items():
        masks = {g: np.arange(sizes[g]) < keep[g] for g in sizes}
        plan = PruningPlan.from_masks(an, masks)
        slims[plan_name] = surgery.apply_plan(model, plan, analysis=an, verify=False).model
    with contextlib.redirect_stdout(io.StringIO()):
        files = [convert(with_batch_size(m, 1), "float32") for m in (model, *slims.values())]
    measured = latency.measure_files(files, threads=1, warmup=10, rounds=_ROUNDS.value, runs=_RUNS.value)
    teacher_ms, teacher_macs = measured[0], stats.count_macs(model)
    rows = []
    for (plan_name, slim), ms in zip(slims.items(), measured[1:]):
        estimate = table.estimate_model(slim)
        by_macs = teacher_ms * stats.count_macs(slim) / teacher_macs
        rows.append(
            {
                "model": name,
                "plan": plan_name,
                "macs": stats.count_macs(slim),
                "teacher_macs": teacher_macs,
                "teacher_ms": teacher_ms,
                "table_teacher_ms": table.estimate(),
                "measured_ms": ms,
                "table_ms": estimate,
                "table_error": (estimate - ms) / ms,
                "macs_ms": by_macs,
                "macs_error": (by_macs - ms) / ms,
                "multiples_out": sorted({m[1] for m in table.multiples().values()}),
            }
        )
        print(
            f"{name} {plan_name}: measured {ms:.4f} ms, table {estimate:.4f} ms ({rows[-1]['table_error']:+.1%}), "
            f"MAC-proportional {by_macs:.4f} ms ({rows[-1]['macs_error']:+.1%})",
            flush=True,
        )
    return rows


def _markdown(rows, header, command):
    lines = [
        "# Latency table: predicted vs measured latency of pruned models",
        "",
        f"`{command}`",
        "",
        header,
        "",
        "| model | plan | MACs (of teacher) | measured | table | table error | MAC-proportional | its error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['macs'] / r['teacher_macs']:.0%} | {r['measured_ms']:.4f} ms | "
            f"{r['table_ms']:.4f} ms | {r['table_error']:+.1%} | {r['macs_ms']:.4f} ms | {r['macs_error']:+.1%} |"
        )
    errors = np.abs([r["table_error"] for r in rows])
    naive = np.abs([r["macs_error"] for r in rows])
    lines += [
        "",
        f"Mean absolute error: table {errors.mean():.1%} (max {errors.max():.1%}); "
        f"MAC-proportional {naive.mean():.1%} (max {naive.max():.1%}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    rows = []
    for name in _MODELS.value:
        rows += _rows(name, rng)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        f"{platform.machine()}, {os.cpu_count()} cores, load average at the end {load}. LiteRT float32, batch 1, "
        f"1 thread; {_ROUNDS.value} interleaved rounds of {_RUNS.value} invokes, fastest kept. Random weights. "
        "Error = (estimate - measured) / measured."
    )
    command = "python benchmarks/latency_table.py " + " ".join(sys.argv[1:])
    out = Path(_RESULTS.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_table.json").write_text(json.dumps({"command": command, "header": header, "rows": rows}, indent=1))
    (out / "latency_table.md").write_text(_markdown(rows, header, command.strip()))
    print(_markdown(rows, header, command.strip()))


if __name__ == "__main__":
    app.run(main)
