"""How much of a full-int8 file's agreement is the draw of its calibration images.

    python benchmarks/int8_draws.py [--models=mobilenetv2_student,mobilenetv2] [--draws=5] [--fixes=...]

For each model of benchmarks/int8.py (its .keras under --out_dir, which `python benchmarks/int8.py`
writes), the automatic int8 export's steps (plain, then every fix, each on top of the previous:
tfsubspace.edge.autoint8.int8_steps) are run again with --draws different calibration sets:
draw k calibrates on training images 500k to 500(k + 1) (draw 0 is benchmarks/int8.py's own
calibration set); the check images (the last 1,000 of the train split) and the test images (the
first --eval_examples of the test split) are the same for every draw; --fixes runs some of the
fixes only (one left out is not under the later ones). Per step: the test agreement of each draw
with the float model, and their spread (min, median, max). Where two steps or two changes to a
step differ by less than this spread, the test split cannot tell them apart. Results:
benchmarks/results/int8_draws.json and int8_draws.md (a run with other --models or --fixes adds
its rows to those there).
"""

import json
import os
import platform
from pathlib import Path

from absl import app, flags

_OUT = flags.DEFINE_string("out_dir", "runs/int8", "Where benchmarks/int8.py put the models.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where int8_draws.json and .md go.")
_MODELS = flags.DEFINE_list("models", ["mobilenetv2_student", "mobilenetv2"], "Models of benchmarks/int8.py.")
_DRAWS = flags.DEFINE_integer("draws", 5, "Calibration sets per model.", lower_bound=1)
_FIXES = flags.DEFINE_list(
    "fixes", ["fold", "equalize", "bias", "output"], "The export's fixes to run (autoint8.FIXES), in their order."
)
_CALIB = 500  # calibration images per draw, as benchmarks/int8.py
_CHECK = 1000  # the last images of the train split, held out of training, as benchmarks/int8.py
_EVAL = flags.DEFINE_integer("eval_examples", 10000, "Test images.", lower_bound=1)


def spread(values: list[float]) -> dict:
    import numpy as np

    return {"min": min(values), "median": float(np.median(values)), "max": max(values)}


def format_markdown(report: dict) -> str:
    lines = [
        f"The automatic int8 export's steps with {report['draws']} calibration sets of "
        f"{report['calibration_examples']} train images each (draw 0: benchmarks/int8.py's), {report['machine']}. "
        f"Test agreement (top-1 with the float model) on the first {report['eval_examples']} test images; the check "
        "images are the same for every draw. Fixes: those each row's command ran, each on top of the previous.",
        "",
        "| model | fixes run | step | test agreement per draw | min | median | max | draws >= 99% | check, median |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        for step in row["steps"]:
            s = step["spread"]
            lines.append(
                f"| {row['model']} | {','.join(row['fixes'])} | {step['step']} | "
                f"{', '.join(f'{a:.2%}' for a in step['test_agreement'])} | "
                f"{s['min']:.2%} | {s['median']:.2%} | {s['max']:.2%} | "
                f"{sum(a >= 0.99 for a in step['test_agreement'])} of {len(step['test_agreement'])} | "
                f"{spread(step['check_agreement'])['median']:.2%} |"
            )
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(row["command"] for row in report["rows"])]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import numpy as np

    from tfsubspace import data, fileio, load_model
    from tfsubspace.edge import autoint8
    from tfsubspace.edge.runtime import TFLiteRunner

    train = data.load_arrays("fashion_mnist", "train")[0].astype(np.float32)  # 0-255 pixels
    test = data.load_arrays("fashion_mnist", "test")[0][: _EVAL.value].astype(np.float32)
    fit, check = train[:-_CHECK], train[-_CHECK:]
    if _DRAWS.value * _CALIB > len(fit):
        raise app.UsageError(f"--draws={_DRAWS.value} needs {_DRAWS.value * _CALIB} training images, not {len(fit)}.")
    rows = []
    for name in _MODELS.value:
        path = Path(_OUT.value) / f"{name}.keras"
        if not path.exists():
            raise app.UsageError(f"No {path}: run `python benchmarks/int8.py --models={name} --train_only`.")
        model = load_model(path)
        expected = np.asarray(model.predict(test, batch_size=256, verbose=0)).argmax(-1)
        agreements: dict[str, list[float]] = {}
        checks: dict[str, list[float]] = {}  # the export's check agreement of each draw
        for draw in range(_DRAWS.value):
            calibration = fit[draw * _CALIB : (draw + 1) * _CALIB]
            for step in autoint8.int8_steps(model, calibration, check, fixes=_FIXES.value, stop_at_pass=False):
                got = TFLiteRunner(step.content)(test).argmax(-1)
                agreements.setdefault(step.name, []).append(float(np.mean(got == expected)))
                checks.setdefault(step.name, []).append(step.agreement)
            print(f"{name} draw {draw}: " + ", ".join(f"{k} {v[-1]:.2%}" for k, v in agreements.items()), flush=True)
        rows.append(
            {
                "model": name,
                "fixes": list(_FIXES.value),
                "steps": [
                    {"step": k, "test_agreement": v, "check_agreement": checks[k], "spread": spread(v)}
                    for k, v in agreements.items()
                ],
            }
        )
    command = "python benchmarks/int8_draws.py" + "".join(
        f" --{flag.name}={','.join(flag.value) if isinstance(flag.value, list) else flag.value}"
        for flag in (_MODELS, _DRAWS, _FIXES, _EVAL, _OUT, _RESULTS)
        if flag.value != flag.default
    )
    for row in rows:
        row["command"] = command
    settings = {"draws": _DRAWS.value, "calibration_examples": _CALIB, "eval_examples": _EVAL.value}
    results = Path(_RESULTS.value)
    saved = json.loads((results / "int8_draws.json").read_text()) if (results / "int8_draws.json").exists() else {}
    if all(saved.get(k) == v for k, v in settings.items()):  # rows of other models or fixes are kept
        ran = {(row["model"], tuple(row["fixes"])) for row in rows}
        rows = [row for row in saved.get("rows", []) if (row["model"], tuple(row["fixes"])) not in ran] + rows
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", **settings, "rows": rows}
    fileio.write_json(results / "int8_draws.json", report)
    fileio.write_text(results / "int8_draws.md", format_markdown(report))
    print(format_markdown(report))


if __name__ == "__main__":
    app.run(main)
