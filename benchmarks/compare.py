"""The comparison: tfsubspace against the peer methods, at the same parameter budgets.

    python benchmarks/compare.py --suite=cpu

For each teacher and data set of the suite (benchmarks/suites.py; teachers from
benchmarks/teachers.py, in --teachers_dir) and each budget (share of the teacher's parameters removed):
- tfsubspace: compress() end to end (energy 0.99 subspaces, latent + output distillation,
  channel LASSO, pruned to the budget, recovery), no labels;
- tfsubspace_stagewise: the same with stage-wise latent learning;
- tfsubspace_macs (only with --methods): end to end with the budget applied to MACs per image
  as well (the same share of the teacher's MACs removed as of its parameters), for a student
  as fast as the filter-pruning peers, which remove MACs and parameters alike;
- l1_filter: Li et al., L1-norm filter pruning of the teacher (one ratio for all layers)
  + fine-tuning with labels;
- slimming: Liu et al., Network Slimming (L1 on BN scales, global threshold) + fine-tuning;
- kd: Hinton et al., distillation (alpha 0.9) with labels, tfsubspace's student architecture
  freshly initialised;
- fitnets: Romero et al., hint training of the middle layer, then distillation with labels,
  same architecture;
- scratch: the same architecture trained from scratch with labels (Liu et al. 2019);
- tfmot: TFMOT magnitude pruning to the budget's sparsity + fine-tuning with labels, in its
  own process under the tfmot environment (`make tfmot`); unstructured, so its .tflite does
  not shrink: its gzip-compressed size is reported beside the real one.
With --budget_kind=macs a budget is the share of the teacher's MACs per image removed, and with
--budget_kind=speedup it is a float32 speed-up asked for (2 = twice as fast): tfsubspace gets
`target_macs` or `target_speedup` alone (its widths chosen for that budget, priced by MACs or
by the latency table it measures), l1_filter and slimming cut to the same MACs (for a speed-up
s, 1/s of the teacher's MACs); results go to --results_dir/SUITE_KIND.
Every method gets the same number of epochs (--epochs) and seed. Each row is exported to
float32 and int8 .tflite (checked against its Keras model) and timed with the LiteRT
interpreter next to its teacher in the same process. Finished rows are skipped and
interrupted runs resume (work files under --runs_dir). Results: --results_dir/SUITE/*.json,
a Markdown table and plots.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags
from suites import SUITES

CODE = None
METHODS = (
    "tfsubspace",
    "tfsubspace_stagewise",
    "tfsubspace_macs",
    "l1_filter",
    "slimming",
    "kd",
    "fitnets",
    "scratch",
    "tfmot",
)

_SUITE = flags.DEFINE_enum("suite", "cpu", list(SUITES), "Which teachers and data sets.")
_TEACHERS = flags.DEFINE_list("teachers", None, "Override the suite's teachers (e.g. vgg16_w0.25).")
_DATASETS = flags.DEFINE_list("datasets", None, "Override the suite's data sets.")
_BUDGETS = flags.DEFINE_list(
    "budgets", None, "Shares of the teacher's parameters (or MACs) removed, or speed-ups (default: the suite's)."
)
_KIND = flags.DEFINE_enum(
    "budget_kind",
    "params",
    ["params", "macs", "speedup"],
    "What a budget counts: parameters or MACs removed (a share), or a float32 speed-up (a factor over 1).",
)
KIND_METHODS = ("tfsubspace", "l1_filter", "slimming")  # the methods that take a MAC or speed-up budget
# tfsubspace_macs is asked for by name: the suites compare at equal parameter budgets
_METHODS = flags.DEFINE_list(
    "methods", [m for m in METHODS if m != "tfsubspace_macs"], f"Methods to run, of {', '.join(METHODS)}."
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", 4, "Training epochs per method (tfsubspace: latent learning + recovery).", lower_bound=2
)
_RECOVER = flags.DEFINE_integer("recover_epochs", 1, "Of --epochs, tfsubspace's recovery epochs.", lower_bound=0)
_LASSO = flags.DEFINE_float("lasso", 0.25, "tfsubspace's channel LASSO factor.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every method.")
_TRAIN_LIMIT = flags.DEFINE_integer(
    "train_limit",
    None,
    "Use only this many training images (default: the suite's limit for the teacher, else all; 0: all).",
    lower_bound=0,
)
_TEST_LIMIT = flags.DEFINE_integer(
    "test_limit", 0, "Measure accuracy and check the .tflite files on the first N test images (0: all).", lower_bound=0
)
_TEACHERS_DIR = flags.DEFINE_string("teachers_dir", "runs/teachers", "Where benchmarks/teachers.py wrote the teachers.")
_RUNS = flags.DEFINE_string("runs_dir", "runs/compare", "Work directories.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results/compare", "Where results go.")
_TFMOT_PYTHON = flags.DEFINE_string("tfmot_python", ".venv-tfmot/bin/python", "Python of the tfmot environment.")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Timed LiteRT invokes per file.", lower_bound=1)
# The speed-up of a row: the fastest invoke of its file and of the teacher's, timed in this many
# interleaved rounds of --latency_runs / rounds invokes each (rows without `speedup_timing`, from
# before, divided the median of the teacher's file by that of the method's, timed one after the other).
_TIMING_ROUNDS = 5
SPEEDUP_TIMING = "fastest invoke, interleaved rounds"
_README = flags.DEFINE_string(
    "readme",
    "benchmarks/README.md",
    "Markdown file (path from the working directory) "
    "whose comparison block, between the markers <!-- compare:SUITE:start --> and "
    "<!-- compare:SUITE:end -->, is regenerated; empty: none.",
)


def main(argv):
    del argv
    from tfsubspace import data
    from tfsubspace.errors import DatasetNotAvailableError

    suite = SUITES[_SUITE.value]
    budgets = _BUDGETS.value or suite.budgets
    for budget in budgets:
        if _KIND.value == "speedup" and not float(budget) > 1:
            raise app.UsageError(f"--budgets: each speed-up must be over 1. Received: {budget}")
        if _KIND.value != "speedup" and not 0 < float(budget) < 1:
            raise app.UsageError(f"--budgets: each must be in (0, 1). Received: {budget}")
    if _KIND.value != "params" and set(_METHODS.value) - set(KIND_METHODS):
        raise app.UsageError(
            f"--budget_kind={_KIND.value} compares {', '.join(KIND_METHODS)}; --methods asked for "
            f"{sorted(set(_METHODS.value) - set(KIND_METHODS))}."
        )
    if _RECOVER.value >= _EPOCHS.value:
        raise app.UsageError("--recover_epochs must be smaller than --epochs.")
    unknown = set(_METHODS.value) - set(METHODS)
    if unknown:
        raise app.UsageError(f"--methods: unknown {sorted(unknown)}; expected some of {METHODS}.")
    global CODE
    CODE = code_version()  # the code this process imported, whatever is committed while it runs
    out_dir = Path(_RESULTS.value) / (_SUITE.value if _KIND.value == "params" else f"{_SUITE.value}_{_KIND.value}")
    started = time.time()
    for teacher_name in _TEACHERS.value or [t.name for t in suite.teachers]:
        for dataset in _DATASETS.value or suite.datasets:
            path = Path(_TEACHERS_DIR.value) / f"{teacher_name}_{dataset}.keras"
            if not path.exists():
                print(f"skip {teacher_name} on {dataset}: no teacher at {path} (benchmarks/teachers.py trains it)")
                continue
            try:
                data.load(dataset, "test", batch_size=1, limit=1)
            except DatasetNotAvailableError as e:
                print(f"skip {dataset}: {e}")
                continue
            limit = suite.train_limits.get(teacher_name) if _TRAIN_LIMIT.value is None else _TRAIN_LIMIT.value or None
            Pair(path, teacher_name, dataset, out_dir, train_limit=limit).run(budgets)
    write_report(out_dir, wall_time_s=time.time() - started, readme=Path(_README.value) if _README.value else None)


class Pair:
    """One teacher on one data set: its row, then every method at every budget."""

    def __init__(self, teacher_path, teacher_name, dataset, out_dir, train_limit=None):
        from tfsubspace import data, evaluate, fileio
        from tfsubspace.models import stats

        self.teacher = fileio.load_model(teacher_path)
        self.teacher_path = Path(teacher_path)
        self.name, self.dataset, self.out_dir = teacher_name, dataset, out_dir
        self.train_limit = limit = train_limit
        self.labeled = data.load(dataset, "train", batch_size=128, seed=_SEED.value, limit=limit)
        self.unlabeled = data.load(dataset, "train", batch_size=128, labels=False, seed=_SEED.value, limit=limit)
        self.test = data.load(dataset, "test", batch_size=512, shuffle=False, limit=_TEST_LIMIT.value or None)
        self.runs = Path(_RUNS.value) / _SUITE.value / f"{teacher_name}_{dataset}"
        self.teacher_params = stats.count_params(self.teacher)
        self.teacher_macs = stats.count_macs(self.teacher)
        self.teacher_eval = evaluate(self.teacher, self.test)
        self.test_images, self.test_labels = _arrays(self.test)
        self.teacher_tflite = self.edge_numbers(self.teacher, self.runs / "teacher")

    def run(self, budgets):
        if not self.done("teacher", 0.0):
            self.record("teacher", 0.0, self.teacher, 0.0, tflite={m: dict(e) for m, e in self.teacher_tflite.items()})
        for budget in map(float, budgets):
            self.run_budget(budget)

    def run_budget(self, budget):
        import keras

        from tfsubspace import CompressionResult
        from tfsubspace import compress as tfsubspace_compress
        from tfsubspace.peers import baselines
        from tfsubspace.prune import surgery

        kind = _KIND.value
        work = self.runs / (f"budget{budget:g}" if kind == "params" else f"{kind}{budget:g}")
        params = int((1 - budget) * self.teacher_params) if kind == "params" else None
        # the peers' MACs: the share left, or for a speed-up s, 1/s of the teacher's
        macs = None
        if kind != "params":
            macs = int((1 - budget) * self.teacher_macs) if kind == "macs" else int(self.teacher_macs / budget)
        total, recover = _EPOCHS.value, _RECOVER.value

        def compress(schedule, macs=False):
            keras.utils.set_random_seed(_SEED.value)
            if kind != "params":  # the budget alone, widths chosen for it
                return tfsubspace_compress(
                    self.teacher,
                    self.unlabeled,
                    work_dir=work / schedule,
                    epochs=total - recover,
                    recover_epochs=recover,
                    lasso=_LASSO.value,
                    target_macs=1 - budget if kind == "macs" else None,
                    target_speedup=budget if kind == "speedup" else None,
                    schedule=schedule,
                    seed=_SEED.value,
                    verbose=2,
                )
            return tfsubspace_compress(
                self.teacher,
                self.unlabeled,
                work_dir=work / (schedule + ("_macs" if macs else "")),
                energy=0.99,
                epochs=total - recover,
                recover_epochs=recover,
                lasso=_LASSO.value,
                target_params=1 - budget,
                target_macs=1 - budget if macs else None,
                schedule=schedule,
                seed=_SEED.value,
                verbose=2,
            )

        # the pruning peers: the teacher cut to the same budget, fine-tuned with labels
        pruning = dict(teacher=self.teacher, labeled_ds=self.labeled, params=params, macs=macs, epochs=total, verbose=2)
        arch = None  # tfsubspace's student architecture, for the methods that train a given one

        def student():
            nonlocal arch
            if arch is None:
                arch = surgery.apply_plan(self.teacher, compress("end_to_end").plan).model
            return baselines.fresh_copy(arch)

        runs = {
            "tfsubspace": lambda: compress("end_to_end"),
            "tfsubspace_stagewise": lambda: compress("stage_wise"),
            "tfsubspace_macs": lambda: compress("end_to_end", macs=True),
            "l1_filter": lambda: baselines.l1_filter_pruning(**pruning, work_dir=work / "l1_filter"),
            "slimming": lambda: baselines.network_slimming(**pruning, work_dir=work / "slimming"),
            "kd": lambda: baselines.train_kd(
                student(), self.teacher, self.labeled, epochs=total, alpha=0.9, work_dir=work / "kd", verbose=2
            ),
            "fitnets": lambda: baselines.fitnets(
                student(), self.teacher, self.labeled, epochs=total, work_dir=work / "fitnets", verbose=2
            ),
            "scratch": lambda: baselines.train_scratch(
                student(), self.labeled, epochs=total, work_dir=work / "scratch", verbose=2
            ),
        }
        for method in _METHODS.value:
            if self.done(method, budget):
                continue
            started = time.time()
            if method == "tfmot":
                self.run_tfmot(budget, work / "tfmot", started)
                continue
            keras.utils.set_random_seed(_SEED.value)
            model, extra = runs[method](), None
            if isinstance(model, CompressionResult):
                # tfsubspace's own latency figures: the table's estimate and its timing, beside the row's
                latency = model.report.get("latency")
                model, extra = model.student, ({"compress_latency": latency} if latency else None)
            self.record(method, budget, model, time.time() - started, edge_dir=work / method / "tflite", extra=extra)

    def run_tfmot(self, budget, work, started):
        from tfsubspace.peers import bridge

        python = Path(_TFMOT_PYTHON.value)
        if not python.exists():
            print(f"skip tfmot: no tfmot environment at {python} (make tfmot makes it)")
            return
        spec = bridge.save_spec(self.teacher, work / "spec")
        command = [
            str(python),
            "benchmarks/tfmot_prune.py",
            f"--spec={spec}",
            f"--dataset={self.dataset}",
            f"--sparsity={budget}",
            f"--epochs={_EPOCHS.value}",
            f"--seed={_SEED.value}",
            f"--out_dir={work}",
        ]
        if self.train_limit:
            command.append(f"--train_limit={self.train_limit}")
        subprocess.run(command, check=True)
        result = json.loads((work / "result.json").read_text())
        tflite = {mode: self.time_file(work / f"{mode}.tflite") for mode in ("float32", "int8")}
        for mode in tflite:
            tflite[mode]["gzip_bytes"] = result[f"{mode}_gzip_bytes"]
        # the dense model keeps every parameter; the nonzero ones are what sparsity saves
        extra = {
            "tfmot": result,
            "accuracy": result["accuracy"],
            "params": result["params"],
            "nonzero_params": result["nonzero_params"],
            "accuracy_bn_reestimated": result.get("accuracy_bn_reestimated"),
        }
        self.record("tfmot", budget, None, time.time() - started, tflite=tflite, extra=extra)

    # ------------------------------------------------------------ measurements

    def edge_numbers(self, model, out_dir) -> dict:
        """float32 and int8 files of `model`, checked, sized, timed and scored on the test split."""
        from tfsubspace import export_tflite

        exported = export_tflite(
            model, out_dir, modes=("float32", "int8"), calibration_ds=self.unlabeled, check_ds=self.test, name="model"
        )
        out = {}
        for e in exported:
            out[e.mode] = {
                **self.time_file(e.path),
                "check_max_abs_error": e.max_abs_error,
                "check_agreement": e.agreement,
                "check_passed": e.passed,
            }
        return out

    def time_file(self, path) -> dict:
        from tfsubspace.edge.runtime import TFLiteRunner

        logits = TFLiteRunner(path)(self.test_images)
        return {
            "path": str(path),
            "bytes": Path(path).stat().st_size,
            "accuracy": float((logits.argmax(-1) == self.test_labels).mean()),
        }

    def time_with_teacher(self, tflite) -> dict:
        """Per mode, this file's median invoke (LiteRT, 1 thread) and its speed-up over the
        teacher's file: the fastest invoke of each, the two timed in interleaved rounds as
        compress() times its student, so that load on the machine falls on both alike."""
        from tfsubspace import measure_files
        from tfsubspace.edge.measure import measure_latency

        out = {}
        for mode, entry in tflite.items():
            entry["latency"] = measure_latency(entry["path"], threads=1, warmup=20, runs=_LATENCY_RUNS.value)
            teacher_ms, ms = measure_files(
                [self.teacher_tflite[mode]["path"], entry["path"]],
                warmup=20,
                rounds=_TIMING_ROUNDS,
                runs=max(1, _LATENCY_RUNS.value // _TIMING_ROUNDS),
            )
            out[mode] = {"teacher_fastest_ms": teacher_ms, "fastest_ms": ms, "speedup": teacher_ms / ms}
        return out

    def done(self, method, budget) -> bool:
        return self.row_path(method, budget).exists()

    def row_path(self, method, budget):
        kind = "" if _KIND.value == "params" or method == "teacher" else _KIND.value
        return self.out_dir / f"{self.name}_{self.dataset}_{kind}{budget:g}_{method}.json"

    def accuracy_bn_reestimated(self, model):
        """Test accuracy of a copy of `model` whose BN statistics are measured again on 50
        training batches: what every method would score without its BN moving averages'
        lag, reported beside the accuracy it delivers."""
        from tfsubspace import evaluate, reestimate_batchnorm
        from tfsubspace.peers import baselines

        copy = baselines.trained_copy(model)
        reestimate_batchnorm(copy, self.unlabeled, 50)
        return evaluate(copy, self.test)["accuracy"]

    def record(self, method, budget, model, seconds, *, edge_dir=None, tflite=None, extra=None):
        from tfsubspace import evaluate, fileio
        from tfsubspace.models import stats

        row = {
            "teacher": self.name,
            "dataset": self.dataset,
            "method": method,
            "budget": budget,
            "budget_kind": _KIND.value if method != "teacher" else None,
            "epochs": _EPOCHS.value if method != "teacher" else None,
            "seed": _SEED.value,
            "teacher_params": self.teacher_params,
            "teacher_macs": self.teacher_macs,
            "teacher_accuracy": self.teacher_eval["accuracy"],
            "train_limit": self.train_limit,
            "test_examples": len(self.test_labels),
        }
        if model is not None:
            row.update(params=stats.count_params(model), macs=stats.count_macs(model), **evaluate(model, self.test))
            row["accuracy_bn_reestimated"] = self.accuracy_bn_reestimated(model)
            tflite = tflite or self.edge_numbers(model, edge_dir)
        else:  # TFMOT: a dense model with zeros, same MACs as the teacher when run
            row.update(macs=self.teacher_macs)
        row.update(extra or {})
        row["tflite"] = tflite
        row["params_removed"] = 1 - row.get("nonzero_params", row["params"]) / self.teacher_params
        row["drop"] = self.teacher_eval["accuracy"] - row["accuracy"]
        row["load_average"] = os.getloadavg()
        row["speedup_timing"] = SPEEDUP_TIMING
        for mode, timing in self.time_with_teacher(tflite).items():
            row[f"speedup_{mode}"] = timing["speedup"]
            row[f"teacher_fastest_{mode}_ms"] = timing["teacher_fastest_ms"]
            row[f"fastest_{mode}_ms"] = timing["fastest_ms"]
        row.update(
            wall_time_s=round(seconds, 1),
            machine=f"{platform.machine()}, {os.cpu_count()} cores",
            command=" ".join(["python", *sys.argv]),
            code=CODE or code_version(),
        )
        fileio.write_json(self.row_path(method, budget), row)
        print(
            f"{self.name} {self.dataset} {budget:g} {method}: accuracy {100 * row['accuracy']:.2f}% "
            f"(teacher {100 * row['teacher_accuracy']:.2f}%), {100 * row['params_removed']:.1f}% removed",
            flush=True,
        )


def _arrays(ds):
    import numpy as np

    images, labels = [], []
    for x, y in ds:
        images.append(np.asarray(x))
        labels.append(np.asarray(y))
    return np.concatenate(images), np.concatenate(labels)


def code_version() -> str:
    """The commit in use, with -dirty when tracked files had uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    )
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- report


def _bn_remeasured(row) -> str:
    value = row.get("accuracy_bn_reestimated", row.get("tfmot", {}).get("accuracy_bn_reestimated"))
    return "-" if value is None or row["method"] == "teacher" else f"{100 * value:.2f}%"


_KIND_TITLES = {"params": "parameter budgets", "macs": "MAC budgets", "speedup": "speed-ups asked for"}
_KIND_NOTES = {
    "params": "",
    "macs": "Budget: share of the teacher's MACs per image removed; tfsubspace gets `target_macs` alone, "
    "l1_filter and slimming cut to the same MACs. ",
    "speedup": "Budget: the float32 speed-up asked for; tfsubspace gets `target_speedup` (priced by the latency "
    "table it measures on this machine), l1_filter and slimming cut to 1/s of the teacher's MACs; the "
    "speed-up column is measured. ",
}


def _budget_label(row, kind) -> str:
    if kind == "speedup":
        return "1x" if row["method"] == "teacher" else f"{row['budget']:g}x"
    return f"{100 * row['budget']:.0f}%"


def write_report(out_dir: Path, wall_time_s: float | None = None, readme: Path | None = None):
    """SUITE.md (one table per teacher and data set), plots, and the README's headline block,
    from every row JSON."""
    from tfsubspace import fileio

    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "run.json"]
    if not rows:
        return
    if wall_time_s is not None:
        runs_file = out_dir / "run.json"
        log = json.loads(runs_file.read_text()) if runs_file.exists() else []
        log.append(
            {
                "command": " ".join(["python", *sys.argv]),
                "wall_time_s": round(wall_time_s),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "finished": time.strftime("%Y-%m-%d %H:%M"),
            }
        )
        fileio.write_json(runs_file, log)
    kind = next((r["budget_kind"] for r in rows if r.get("budget_kind")), "params")
    suite = out_dir.name.removesuffix(f"_{kind}")
    order = {m: i for i, m in enumerate(("teacher", *METHODS))}
    rows.sort(key=lambda r: (r["teacher"], r["dataset"], r["budget"], -r["accuracy"], order.get(r["method"], 99)))
    lines = [
        f"# tfsubspace against its peers at equal {_KIND_TITLES[kind]}",
        "",
        f"Generated by `python benchmarks/compare.py --suite={suite}"
        + (f" --budget_kind={kind}" if kind != "params" else "")
        + "` from the row files beside this one. "
        + _KIND_NOTES[kind]
        + "One seed; accuracy on the test split, all of it unless a line below says otherwise (Keras float32 "
        "model; the int8 column is the int8 .tflite file run by LiteRT); drop = teacher - method, in points; "
        "latency is the median of one-image LiteRT invokes on 1 thread (200 after 20 warm-up); speed-up = the "
        "teacher's fastest invoke / the method's, the two files timed in interleaved rounds in the same process "
        "(rows made before `speedup_timing` was recorded: the ratio of the medians, each file timed right after "
        "the teacher's). BN re-measured: the same model's accuracy with its BatchNormalization "
        "statistics measured again on 50 training batches (rows made before it was recorded: -). "
        "TFMOT's params are its nonzero weights; its files stay dense (gzip size in brackets).",
        "",
    ]
    pairs = sorted({(r["teacher"], r["dataset"]) for r in rows})
    for teacher, dataset in pairs:
        group = [r for r in rows if (r["teacher"], r["dataset"]) == (teacher, dataset)]
        lines += [
            f"## {teacher} on {dataset}",
            "",
            "| budget | method | params | removed | MACs | accuracy | drop | BN re-measured | int8 acc. | "
            "float32 file | int8 file | float32 latency | int8 latency | speed-up f32 / int8 | epochs | wall time |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        limits = sorted({r.get("train_limit") for r in group if r["method"] != "teacher"} - {None})
        if limits:
            lines[-2:-2] = [
                f"Every method trained on the first {' / '.join(f'{n:,}' for n in limits)} training "
                "images (the suite's limit, or `--train_limit`); the teacher on all of them.",
                "",
            ]
        tested = sorted({r["test_examples"] for r in group if "test_examples" in r})
        if tested:
            lines[-2:-2] = [f"Accuracy on {' / '.join(f'{n:,}' for n in tested)} test images (`--test_limit`).", ""]
        for r in group:
            t = r["tflite"]
            gz = lambda m: f" ({t[m]['gzip_bytes'] / 1024:.0f})" if "gzip_bytes" in t[m] else ""
            best = r["method"] != "teacher" and r["accuracy"] == max(
                x["accuracy"] for x in group if x["budget"] == r["budget"] and x["method"] != "teacher"
            )
            acc = f"{100 * r['accuracy']:.2f}%"
            lines.append(
                f"| {_budget_label(r, kind)} | {r['method']} | {r.get('nonzero_params', r['params']):,} | "
                f"{100 * r['params_removed']:.1f}% | {r['macs'] / 1e6:.1f}M | {f'**{acc}**' if best else acc} | "
                f"{100 * r['drop']:+.2f} | {_bn_remeasured(r)} | {100 * t['int8']['accuracy']:.2f}% | "
                f"{t['float32']['bytes'] / 1024:.0f} KiB"
                f"{gz('float32')} | {t['int8']['bytes'] / 1024:.0f} KiB{gz('int8')} | "
                f"{t['float32']['latency']['median_ms']:.3f} ms | {t['int8']['latency']['median_ms']:.3f} ms | "
                f"{r['speedup_float32']:.2f}x / {r['speedup_int8']:.2f}x | {r['epochs'] or '-'} | "
                f"{r['wall_time_s'] / 60:.1f} min |"
            )
        lines.append("")
    lines.append(f"Machine: {rows[0]['machine']}. Code: {', '.join(sorted({r['code'] for r in rows}))}.")
    runs_file = out_dir / "run.json"
    if runs_file.exists():
        for run in json.loads(runs_file.read_text()):
            lines.append(f"Run `{run['command']}`: {run['wall_time_s'] / 3600:.2f} h, finished {run['finished']}.")
    lines += ["", *[f"![{t} {d}]({out_dir.name}/{t}_{d}_accuracy.png)" for t, d in pairs]]
    fileio.write_text(out_dir.parent / f"{out_dir.name}.md", "\n".join(lines) + "\n")
    for teacher, dataset in pairs:
        plot(rows, teacher, dataset, out_dir / f"{teacher}_{dataset}_accuracy.png")
    if readme is not None and readme.exists():
        start, end = f"<!-- compare:{out_dir.name}:start -->", f"<!-- compare:{out_dir.name}:end -->"
        text = readme.read_text(encoding="utf-8")
        if start in text and end in text:
            block = headline(rows, pairs, out_dir)
            text = text[: text.index(start) + len(start)] + "\n" + block + text[text.index(end) :]
            fileio.write_text(readme, text)


def headline(rows, pairs, out_dir) -> str:
    """Per teacher and data set: test accuracy (drop in points) of every method at every budget."""
    lines = []
    for teacher, dataset in pairs:
        group = [r for r in rows if (r["teacher"], r["dataset"]) == (teacher, dataset)]
        t = next((r for r in group if r["method"] == "teacher"), None)
        budgets = sorted({r["budget"] for r in group if r["method"] != "teacher"})
        methods = sorted({r["method"] for r in group} - {"teacher"}, key=lambda m: METHODS.index(m))
        title = f"**{teacher} on {dataset}**" + (
            f" (teacher {100 * t['accuracy']:.2f}%, {t['params']:,} params)" if t else ""
        )
        lines += [
            title,
            "",
            "| method | " + " | ".join(f"{100 * b:.0f}% removed" for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        for method in methods:
            cells = []
            for b in budgets:
                r = next((x for x in group if x["method"] == method and x["budget"] == b), None)
                if r is None:
                    cells.append("-")
                    continue
                best = r["accuracy"] == max(
                    x["accuracy"] for x in group if x["budget"] == b and x["method"] != "teacher"
                )
                change = 100 * -r["drop"] if abs(r["drop"]) >= 5e-5 else 0.0
                cell = f"{100 * r['accuracy']:.2f}% ({change:+.2f})"
                cells.append(f"**{cell}**" if best else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        f"Accuracy (change against the teacher, in points) on the full test split; best per budget in bold. "
        f"Every column: {out_dir.parent.name}/{out_dir.name}.md, with sizes, MACs, int8 accuracy and latency."
    )
    return "\n".join(lines) + "\n"


def plot(rows, teacher, dataset, path):
    """Accuracy against parameters and against int8 latency, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfsubspace import fileio

    group = [r for r in rows if (r["teacher"], r["dataset"]) == (teacher, dataset)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in sorted({r["method"] for r in group} - {"teacher"}):
        points = sorted((r for r in group if r["method"] == method), key=lambda r: r["budget"])
        axes[0].plot(
            [r.get("nonzero_params", r["params"]) for r in points],
            [100 * r["accuracy"] for r in points],
            marker="o",
            label=method,
        )
        axes[1].plot(
            [r["tflite"]["int8"]["latency"]["median_ms"] for r in points],
            [100 * r["tflite"]["int8"]["accuracy"] for r in points],
            marker="o",
            label=method,
        )
    teacher_row = next((r for r in group if r["method"] == "teacher"), None)
    for ax in axes:
        if teacher_row:
            ax.axhline(100 * teacher_row["accuracy"], color="gray", linestyle="--", label="teacher")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters (nonzero for TFMOT)")
    axes[0].set_title(f"{teacher} on {dataset}: accuracy vs size")
    axes[1].set_xlabel("int8 LiteRT latency, 1 thread (ms)")
    axes[1].set_title("int8 .tflite accuracy vs latency")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
