"""Exports Keras models to .tflite and benchmarks them side by side for the edge.

    python scripts/benchmark.py --models=teacher=runs/demo/teacher.keras,student=runs/demo/compress/student.keras \
        --dataset=mnist --out_dir=runs/demo/bench

The first model is the baseline of the speed-ups (and the reference of top-1 agreement).
Labels name the files (LABEL_MODE.tflite), so each must be unique. All models are calibrated
and evaluated on the same images, in one pixel range (--input_range, printed).
Writes OUT_DIR/benchmark.json, benchmark.md and the plots, and prints the table.
"""

from absl import app, flags
from flagdefs import define_dataset

from tfsubspace.edge.convert import MODES

_MODELS = flags.DEFINE_list(
    "models", None, "label=path.keras entries, labels unique; the first is the baseline.", required=True
)
_UNSAFE = flags.DEFINE_boolean("unsafe_deserialization", False, "Allow code (Lambda layers) in the models.")
_DATASET = define_dataset("Calibration (train) and evaluation (test) images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory.")
_INPUT_RANGE = flags.DEFINE_enum(
    "input_range",
    "auto",
    ["auto", "0-1", "0-255"],
    "Pixel range of the images; auto: 0-255 if the models start with Rescaling(1/255) "
    "(or 1/127.5), else 0-1 (the models must agree).",
)
_MODES = flags.DEFINE_multi_enum("modes", ["float32", "int8"], list(MODES), "Export modes to benchmark.")
_OUT = flags.DEFINE_string("out_dir", None, "Where files and the report go.", required=True)
_THREADS = flags.DEFINE_integer("threads", 1, "Interpreter threads.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 20, "Warm-up invokes.", lower_bound=0)
_RUNS = flags.DEFINE_integer("runs", 200, "Timed invokes.", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_examples", 1000, "Test images for accuracy and agreement.", lower_bound=1)


@flags.validator("models")
def _check_models(entries):
    """Each entry is label=path with a label of its own: the label names the exported files,
    so a repeated one would silently overwrite the earlier model's files."""
    seen = set()
    for entry in entries or ():
        label, _, path = entry.partition("=")
        if not label or not path:
            raise flags.ValidationError(f"--models entries are label=path.keras; {entry!r} is not.")
        if label in seen:
            raise flags.ValidationError(
                f"--models gives the label {label!r} twice: labels name the exported files "
                f"({label}_MODE.tflite), so the second model would overwrite the first. "
                "Give each model its own label."
            )
        seen.add(label)
    return True


def main(argv):
    del argv
    from pathlib import Path

    from tfsubspace import data, fileio, load_model
    from tfsubspace.edge import export, measure
    from tfsubspace.edge.input_range import resolve_input_range

    out = Path(_OUT.value)
    models = {}
    for spec in _MODELS.value:
        label, path = spec.split("=", 1)
        models[label] = load_model(path, safe_mode=not _UNSAFE.value)
    ranges = {label: resolve_input_range(model, _INPUT_RANGE.value) for label, model in models.items()}
    if len({r for r, _ in ranges.values()}) > 1:
        raise app.UsageError(
            "--input_range=auto: the models take different pixel ranges ("
            + "; ".join(f"{label}: {r}, {why}" for label, (r, why) in ranges.items())
            + "), but are evaluated on the same images. Benchmark them separately."
        )
    input_range = next(iter(ranges.values()))[0]
    print(f"input range: {input_range} (" + "; ".join(f"{label}: {why}" for label, (_, why) in ranges.items()) + ")")
    calibration = data.load(
        _DATASET.value, "train", batch_size=100, labels=False, seed=0, data_dir=_DATA_DIR.value, value_range=input_range
    )
    test = data.load(
        _DATASET.value, "test", batch_size=500, shuffle=False, data_dir=_DATA_DIR.value, value_range=input_range
    )
    entries = []
    for label, model in models.items():
        for r in export.export(
            model,
            out,
            modes=_MODES.value,
            calibration_ds=calibration,
            check_ds=test,
            name=label,
            input_range=input_range,
        ):
            status = "ok" if r.passed else f"FAILED: {r.message}"
            print(
                f"{label} {r.mode}: agreement with Keras {r.agreement:.2%}, "
                f"max abs error {r.max_abs_error:.3g} ({status})"
            )
            entries.append(measure.BenchEntry(label, r.path, r.mode, model))
    report = measure.benchmark(
        entries,
        eval_ds=test,
        eval_examples=_EVAL.value,
        reference=next(iter(models.values())),
        threads=_THREADS.value,
        warmup=_WARMUP.value,
        runs=_RUNS.value,
        input_range=input_range,
    )
    fileio.write_json(out / "benchmark.json", report)
    table = measure.format_table(report)
    fileio.write_text(out / "benchmark.md", table)
    measure.plot(report, out)
    print(table)


if __name__ == "__main__":
    app.run(main)
