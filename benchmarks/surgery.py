"""Benchmark: how long channel analysis and surgery take on the reference models.

    python benchmarks/surgery.py

For each model: the channel analysis, then apply_plan with a plan that keeps a random half
of every prunable group (rebuild, weight slicing and the masked-model check on a batch of
4), repeated --repeats times; reports the median and the range. Writes
benchmarks/results/surgery.json and surgery.md.
"""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per model.", lower_bound=1)
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where the JSON and Markdown results go.")


def main(argv):
    del argv
    import numpy as np

    from tfsubspace import fileio, models
    from tfsubspace.prune import analysis, surgery
    from tfsubspace.prune.plan import PruningPlan

    cases = (
        ("VGG-16 (width 1.0), 32x32x3", lambda: models.vgg16((32, 32, 3), 10, width=1.0)),
        ("WRN-16-4, 32x32x3", lambda: models.wide_resnet((32, 32, 3), 10, depth=16, widen_factor=4)),
    )
    rows = []
    for label, build in cases:
        model = build()
        analyze_s, surgery_s = [], []
        for repeat in range(_REPEATS.value):
            start = time.perf_counter()
            a = analysis.analyze(model)
            analyze_s.append(time.perf_counter() - start)
            rng = np.random.default_rng(repeat)
            masks = {g.name: rng.random(g.size) < 0.5 for g in a.groups.values() if g.prunable}
            for mask in masks.values():
                mask[0] = True
            plan = PruningPlan.from_masks(a, masks)
            start = time.perf_counter()
            result = surgery.apply_plan(model, plan, analysis=a)
            surgery_s.append(time.perf_counter() - start)
        rows.append(
            {
                "model": label,
                "params_before": model.count_params(),
                "params_after": result.model.count_params(),
                "groups": len(a.groups),
                "analysis_s_median": round(statistics.median(analyze_s), 3),
                "surgery_s_median": round(statistics.median(surgery_s), 3),
                "surgery_s_min": round(min(surgery_s), 3),
                "surgery_s_max": round(max(surgery_s), 3),
                "max_abs_diff": result.max_abs_diff,
            }
        )
        print(rows[-1])
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg(),
        "repeats": _REPEATS.value,
    }
    results = Path(_RESULTS.value)
    fileio.write_json(results / "surgery.json", {"meta": meta, "rows": rows})
    load = ", ".join(f"{v:.1f}" for v in meta["load_average_at_end"])
    lines = [
        "# Surgery time on the reference models",
        "",
        f"`{meta['command']}` on {meta['machine']}; median of {meta['repeats']} runs (min-max); "
        f"load average at the end {load} (other jobs were running when it is above 0). "
        "Surgery = rebuild + weight slicing + masked-model check on a batch of 4; the plan keeps "
        "a random half of every prunable group.",
        "",
        "| model | groups | params before -> after | analysis | surgery | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['params_before']:,} -> {r['params_after']:,} | "
            f"{r['analysis_s_median']:.2f} s | {r['surgery_s_median']:.2f} s "
            f"({r['surgery_s_min']:.2f}-{r['surgery_s_max']:.2f}) | {r['max_abs_diff']:.1e} |"
        )
    fileio.write_text(results / "surgery.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
