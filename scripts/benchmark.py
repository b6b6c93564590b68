"""Exports Keras models to .tflite and benchmarks them side by side for the edge.

    python scripts/benchmark.py --models=teacher=runs/demo/teacher.keras,student=runs/demo/compress/student.keras \
        --dataset=mnist --out_dir=runs/demo/bench

The first model is the baseline of the speed-ups (and the reference of top-1 agreement).
Writes OUT_DIR/benchmark.json, benchmark.md and the plots, and prints the table.
"""

from absl import app, flags

from tfsubspace.export import MODES

_MODELS = flags.DEFINE_list("models", None, "label=path.keras entries; the first is the baseline.", required=True)
_UNSAFE = flags.DEFINE_boolean("unsafe_deserialization", False, "Allow code (Lambda layers) in the models.")
_DATASET = flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"],
                             "Calibration (train) and evaluation (test) images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory.")
_MODES = flags.DEFINE_multi_enum("modes", ["float32", "int8"], list(MODES), "Export modes to benchmark.")
_OUT = flags.DEFINE_string("out_dir", None, "Where files and the report go.", required=True)
_THREADS = flags.DEFINE_integer("threads", 1, "Interpreter threads.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 20, "Warm-up invokes.", lower_bound=0)
_RUNS = flags.DEFINE_integer("runs", 200, "Timed invokes.", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_examples", 1000, "Test images for accuracy and agreement.", lower_bound=1)

flags.register_validator("models", lambda v: v is None or all("=" in e for e in v), "--models entries are label=path")


def main(argv):
    del argv
    from pathlib import Path

    from tfsubspace import data, edgebench, export, fileio, load_model

    out = Path(_OUT.value)
    calibration = data.load(_DATASET.value, "train", batch_size=100, labels=False, seed=0, data_dir=_DATA_DIR.value)
    test = data.load(_DATASET.value, "test", batch_size=500, shuffle=False, data_dir=_DATA_DIR.value)
    entries, reference = [], None
    for spec in _MODELS.value:
        label, path = spec.split("=", 1)
        model = load_model(path, safe_mode=not _UNSAFE.value)
        reference = reference or model
        for r in export.export(model, out, modes=_MODES.value, calibration_ds=calibration, check_ds=test, name=label):
            status = "ok" if r.passed else f"FAILED: {r.message}"
            print(f"{label} {r.mode}: agreement with Keras {r.agreement:.2%}, max abs error {r.max_abs_error:.3g} ({status})")
            entries.append(edgebench.BenchEntry(label, r.path, r.mode, model))
    report = edgebench.benchmark(entries, eval_ds=test, eval_examples=_EVAL.value, reference=reference,
                                 threads=_THREADS.value, warmup=_WARMUP.value, runs=_RUNS.value)
    fileio.write_json(out / "benchmark.json", report)
    table = edgebench.format_table(report)
    fileio.write_text(out / "benchmark.md", table)
    edgebench.plot(report, out)
    print(table)


if __name__ == "__main__":
    app.run(main)
