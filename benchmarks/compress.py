"""Benchmark: tfsubspace compress() against baselines at the same student size, on real data.

    python benchmarks/compress.py --datasets=mnist,fashion_mnist --lasso=1.0,2.0

Teacher: VGG-16 (width 0.25) trained by benchmarks/teachers.py (runs/teachers/). For each data
set and LASSO factor:
- tfsubspace: compress() with energy 0.99 subspaces, end-to-end latent learning + output
  distillation with the channel LASSO (no labels), prune, recover;
- scratch: the tfsubspace student's final architecture, random init, trained with labels;
- scratch_lasso: the subspace-width architecture, random init, trained with labels and the
  same LASSO, pruned and recovered the same way;
- kd_only: the final architecture, random init, output distillation alone (no labels).
Every method gets the same epochs (--epochs + --recover_epochs) and seed. Results:
benchmarks/results/compress/*.json and benchmarks/results/compress.md. Finished runs are
skipped; interrupted ones resume (work files under --runs_dir).
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

_DATASETS = flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Data sets.")
_LASSO = flags.DEFINE_list("lasso", ["1.0", "2.0"], "Channel LASSO factors (one operating point each).")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs of training with LASSO.", lower_bound=1)
_RECOVER = flags.DEFINE_integer("recover_epochs", 2, "Recovery epochs.", lower_bound=0)
_ENERGY = flags.DEFINE_float("energy", 0.99, "Subspace energy share.")
_TEACHERS = flags.DEFINE_string("teachers_dir", "runs/teachers", "Where benchmarks/teachers.py wrote the teachers.")
_RUNS = flags.DEFINE_string("runs_dir", "runs/bench_compress", "Work directories.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where results go.")
_METHODS = flags.DEFINE_list("methods", ["tfsubspace", "scratch", "scratch_lasso", "kd_only"], "Methods to run.")


def main(argv):
    del argv
    import keras

    from tfsubspace import compress as tfsubspace_compress
    from tfsubspace import data, evaluate, fileio
    from tfsubspace.models import stats
    from tfsubspace.peers import baselines
    from tfsubspace.prune import surgery
    from tfsubspace.prune.plan import PruningPlan

    out_dir = Path(_RESULTS.value) / "compress"
    code = code_version()  # the code this process imported, whatever commits come during the run
    for dataset in _DATASETS.value:
        teacher = fileio.load_model(Path(_TEACHERS.value) / f"vgg16_w0.25_{dataset}.keras")
        unlabeled = data.load(dataset, "train", batch_size=128, labels=False, seed=0)
        labeled = data.load(dataset, "train", batch_size=128, seed=0)
        test = data.load(dataset, "test", batch_size=512, shuffle=False)
        teacher_eval = evaluate(teacher, test)
        for lasso in map(float, _LASSO.value):
            key = f"{dataset}_lasso{lasso:g}"
            work = Path(_RUNS.value) / key
            total_epochs = _EPOCHS.value + _RECOVER.value

            def record(method, model, started, extra=None):
                result = {
                    "dataset": dataset,
                    "teacher": teacher.name,
                    "method": method,
                    "lasso": lasso,
                    "epochs": total_epochs,
                    "teacher_accuracy": teacher_eval["accuracy"],
                    "teacher_params": stats.count_params(teacher),
                    "teacher_macs": stats.count_macs(teacher),
                    "params": stats.count_params(model),
                    "macs": stats.count_macs(model),
                    **dict(evaluate(model, test, teacher).items()),
                    "wall_time_s": round(time.time() - started, 1),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "command": " ".join(["python", *sys.argv]),
                    "code": code,
                    **(extra or {}),
                }
                result["params_removed"] = 1 - result["params"] / result["teacher_params"]
                result["drop"] = result["teacher_accuracy"] - result["accuracy"]
                fileio.write_json(out_dir / f"{key}_{method}.json", result)
                print(
                    f"{key} {method}: acc {result['accuracy']:.4f} (teacher {result['teacher_accuracy']:.4f}), "
                    f"{100 * result['params_removed']:.1f}% params removed",
                    flush=True,
                )

            done = lambda method: (out_dir / f"{key}_{method}.json").exists()
            started = time.time()
            keras.utils.set_random_seed(0)
            compressed = tfsubspace_compress(
                teacher,
                unlabeled,
                work_dir=work / "tfsubspace",
                energy=_ENERGY.value,
                epochs=_EPOCHS.value,
                recover_epochs=_RECOVER.value,
                lasso=lasso,
                verbose=2,
            )
            if "tfsubspace" in _METHODS.value and not done("tfsubspace"):
                record("tfsubspace", compressed.student, started, {"stage_seconds": compressed.report["stage_seconds"]})
            final_arch = surgery.apply_plan(teacher, compressed.plan).model
            subspace_arch = surgery.apply_plan(teacher, PruningPlan.load(compressed.paths["plan_subspace"])).model
            runs = {
                "scratch": lambda: baselines.train_scratch(
                    baselines.fresh_copy(final_arch), labeled, epochs=total_epochs, work_dir=work / "scratch", verbose=2
                ),
                "scratch_lasso": lambda: baselines.train_scratch(
                    baselines.fresh_copy(subspace_arch),
                    labeled,
                    epochs=_EPOCHS.value,
                    lasso=lasso,
                    recover_epochs=_RECOVER.value,
                    multiple=8,
                    work_dir=work / "scratch_lasso",
                    verbose=2,
                ),
                "kd_only": lambda: baselines.train_kd_only(
                    baselines.fresh_copy(final_arch),
                    teacher,
                    unlabeled,
                    epochs=total_epochs,
                    work_dir=work / "kd_only",
                    verbose=2,
                ),
            }
            for method, run in runs.items():
                if method in _METHODS.value and not done(method):
                    keras.utils.set_random_seed(0)
                    started = time.time()
                    record(method, run(), started)
    write_table(Path(_RESULTS.value))


def code_version() -> str:
    """The commit the run used, with -dirty when the tree had uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


def write_table(results: Path):
    from tfsubspace import fileio

    rows = [json.loads(p.read_text()) for p in sorted((results / "compress").glob("*.json"))]
    order = {"tfsubspace": 0, "scratch": 1, "scratch_lasso": 2, "kd_only": 3}
    rows.sort(key=lambda r: (r["dataset"], r["lasso"], order.get(r["method"], 9)))
    lines = [
        "# tfsubspace against baselines at the same student size",
        "",
        "Generated by `python benchmarks/compress.py` (VGG-16 width 0.25 teachers from benchmarks/teachers.py); "
        "one seed per row. Accuracy on the full test split; drop = teacher - student, in points.",
        "",
        "| data set | LASSO | method | params | removed | MACs | accuracy | drop | agreement | epochs | wall time |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['lasso']:g} | {r['method']} | {r['params']:,} | {100 * r['params_removed']:.1f}% | "
            f"{r['macs']:,} | {100 * r['accuracy']:.2f}% | {100 * r['drop']:+.2f} | {100 * r['agreement']:.2f}% | "
            f"{r['epochs']} | {r['wall_time_s'] / 60:.1f} min |"
        )
    if rows:
        lines += [
            "",
            f"Machine: {rows[0]['machine']}. Teacher accuracy: "
            + ", ".join(sorted({f"{r['dataset']} {100 * r['teacher_accuracy']:.2f}%" for r in rows})),
        ]
    fileio.write_text(results / "compress.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
