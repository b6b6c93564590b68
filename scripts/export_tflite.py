"""Exports a Keras model to .tflite (float32, float16, dynamic-range, full int8), checked.

    python scripts/export_tflite.py --model=runs/demo/compress/student.keras --dataset=mnist \
        --out_dir=runs/demo/tflite --c_array [--qat]

Each file is run with the LiteRT interpreter against the Keras model on test images (max abs
error, top-1 agreement and its 95% interval over those images). A full-int8 file under
--min_agreement is reported as failed and the command exits with status 2. --c_array writes
model_data.cc/.h for TFLite Micro firmware; --edgetpu prints the Edge TPU compatibility report
of the int8 file. The images are fed in the range the model takes (--input_range; auto: 0-255
for a model that starts with Rescaling(1/255), else 0-1), and the range used is printed.

Full int8 is automatic: when the plain post-training file fails the check, the float model is
rewritten (--int8_fixes: BatchNormalization folding, cross-layer equalization, bias
correction, the logits clipped to where the top classes fall, in that order) until a file
passes; the agreement of each step is printed, and for a failing plain file the tensors that
lose it. --diagnose prints the per-tensor error table of the plain post-training int8 file
(where it loses the model, and why).
"""

import sys

from absl import app, flags
from flagdefs import define_dataset

from tfsubspace.edge.autoint8 import DEFAULT_MIN_AGREEMENT
from tfsubspace.edge.convert import DEFAULT_MODES, MODES

_MODEL = flags.DEFINE_string("model", None, "The Keras model (.keras).", required=True)
_UNSAFE = flags.DEFINE_boolean("unsafe_deserialization", False, "Allow code (Lambda layers) in --model.")
_DATASET = define_dataset("Images for int8 calibration (train split) and the checks (test split).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory.")
_INPUT_RANGE = flags.DEFINE_enum(
    "input_range",
    "auto",
    ["auto", "0-1", "0-255"],
    "Pixel range of the calibration and check images; auto: 0-255 if the model "
    "starts with Rescaling(1/255) (or 1/127.5), else 0-1.",
)
_MODES = flags.DEFINE_multi_enum(
    "modes", list(DEFAULT_MODES), list(MODES), "Export modes (int16x8: 16-bit activations, int8 weights)."
)
_OUT = flags.DEFINE_string("out_dir", None, "Where the .tflite files go.", required=True)
_NAME = flags.DEFINE_string("name", None, "File name prefix (default: the model's name).")
_IO = flags.DEFINE_enum("io_dtype", "int8", ["int8", "uint8", "float32"], "Input/output type of the int8 model.")
_CALIB = flags.DEFINE_integer("calibration_examples", 300, "Calibration images.", lower_bound=1)
_CHECK = flags.DEFINE_integer(
    "check_examples", 1000, "Images for the checks (99% on 1,000 is 98.2-99.5%, 95% interval).", lower_bound=1
)
_MIN_AGREE = flags.DEFINE_float(
    "min_agreement",
    DEFAULT_MIN_AGREEMENT,
    "Least top-1 agreement of a quantized file.",
    lower_bound=0.0,
    upper_bound=1.0,
)
_FIXES = flags.DEFINE_list(
    "int8_fixes",
    ["fold", "equalize", "bias", "output"],
    "Float rewrites full int8 may try, in this order, when the plain file fails its check "
    "(fold, equalize, bias, output); empty for plain post-training int8 only.",
)
_DIAGNOSE = flags.DEFINE_boolean(
    "diagnose", False, "Print the per-tensor error table of the plain post-training int8 file."
)
_C_ARRAY = flags.DEFINE_boolean("c_array", False, "Write model_data.cc/.h of the int8 file (TFLite Micro).")
_EDGETPU = flags.DEFINE_boolean("edgetpu", False, "Print the Edge TPU report of the int8 file.")
_QAT = flags.DEFINE_boolean(
    "qat",
    False,
    "Also write an int8 file made by quantization-aware training (needs the tfmot environment: make tfmot).",
)
_QAT_TEACHER = flags.DEFINE_string(
    "qat_teacher", None, "Teacher (.keras) whose soft outputs QAT matches (default: the float model itself)."
)
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 2, "Quantization-aware training epochs.", lower_bound=1)
_QAT_EXAMPLES = flags.DEFINE_integer("qat_examples", 10000, "Training images for QAT (no labels).", lower_bound=1)
_TFMOT_PYTHON = flags.DEFINE_string(
    "tfmot_python",
    None,
    "Python of the tfmot environment (default: $TFSUBSPACE_TFMOT_PYTHON or .venv-tfmot/bin/python).",
)


def main(argv):
    del argv
    from tfsubspace import data, load_model
    from tfsubspace.edge import autoint8, diagnose, edgetpu, export, micro, qat
    from tfsubspace.edge.input_range import resolve_input_range

    model = load_model(_MODEL.value, safe_mode=not _UNSAFE.value)
    input_range, why = resolve_input_range(model, _INPUT_RANGE.value)
    print(f"input range: {input_range} ({why})")
    common = dict(batch_size=100, labels=False, data_dir=_DATA_DIR.value, value_range=input_range)
    calibration = data.load(_DATASET.value, "train", seed=0, **common)
    checks = data.load(_DATASET.value, "test", shuffle=False, **common)
    results = export.export(
        model,
        _OUT.value,
        modes=_MODES.value,
        calibration_ds=calibration,
        check_ds=checks,
        calibration_examples=_CALIB.value,
        check_examples=_CHECK.value,
        min_agreement=_MIN_AGREE.value,
        io_dtype=_IO.value,
        name=_NAME.value,
        input_range=input_range,
        int8_fixes=tuple(f for f in _FIXES.value if f),
    )
    if _QAT.value:
        teacher = load_model(_QAT_TEACHER.value, safe_mode=not _UNSAFE.value) if _QAT_TEACHER.value else None
        results.append(
            qat.export_qat(
                model,
                _OUT.value,
                calibration,
                teacher=teacher,
                epochs=_QAT_EPOCHS.value,
                train_examples=_QAT_EXAMPLES.value,
                check_ds=checks,
                check_examples=_CHECK.value,
                min_agreement=_MIN_AGREE.value,
                name=_NAME.value,
                python=_TFMOT_PYTHON.value,
                input_range=input_range,
            )
        )
    print(f"{'mode':<9} {'size':>10} {'max abs error':>14} {'agreement':>10} {'95% interval':>15}  file")
    for r in results:
        low, high = r.agreement_interval
        print(
            f"{r.mode:<9} {r.size_bytes / 1024:>8.1f}KiB {r.max_abs_error:>14.4g} {r.agreement:>10.2%} "
            f"{f'{low:.1%}-{high:.1%}':>15}  {r.path}" + ("" if r.passed else "  FAILED")
        )
    int8 = next((r for r in results if r.mode == "int8"), None)
    if int8 is not None and int8.steps:
        print(autoint8.format_step_rows(int8.steps))
        for line in int8.diagnosis:
            print(f"  {line}")
    qat_result = next((r for r in results if r.mode == "int8_qat"), None)
    if qat_result is not None:  # the model before training (qat_0) and each epoch, checked
        print(autoint8.format_step_rows(qat_result.steps))
    if int8 is not None and _DIAGNOSE.value:
        plain = autoint8.int8_steps(
            model, export._images(calibration, _CALIB.value), export._images(checks, _CHECK.value), fixes=()
        )[0]
        print(diagnose.format_diagnosis(diagnose.diagnose(plain.content, model, export._images(checks, _CHECK.value))))
    if int8 is not None and (_C_ARRAY.value or _EDGETPU.value):
        if _C_ARRAY.value:
            arena = micro.micro_arena_bytes(int8.path)
            for path in micro.write_c_array(int8.path, _OUT.value, arena_bytes=arena):
                print(f"wrote {path} (TFLite Micro arena: {arena} bytes)")
        if _EDGETPU.value:
            print(edgetpu.format_edgetpu_report(edgetpu.edgetpu_check(int8.path)))
    for r in results:
        if r.passed and r.message:  # the steps that made it pass, or a pass the check images cannot be sure of
            print(f"note: {r.path}: {r.message}")
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"ERROR: {r.path}: {r.message}", file=sys.stderr)
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
