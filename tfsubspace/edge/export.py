"""TFLite export: float32, float16, dynamic-range int8 and full int8, each checked.

`export(model, out_dir, calibration_ds=..., check_ds=...)` converts a Keras model with a fixed
batch size of 1 (static shapes: what the Edge TPU and TFLite Micro need, and what a phone runs),
writes each file atomically, and runs every file with the LiteRT interpreter against the Keras
model on the check images: max abs error of the outputs and top-1 agreement. A full-int8 file
whose agreement falls under `min_agreement` is reported as failed, with what to try.

Calibration and checks must use images in the range the model takes: a model that starts
with Rescaling(1/255) takes 0-255 pixels, and an int8 file calibrated on [0, 1] images clips
every real input above 1 while its check (on the same wrong images) still looks perfect.
export() refuses such data (InputRangeError); `input_range` states the range explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError

MODES = ("float32", "float16", "dynamic", "int8")

# TFLite builtin operators the Edge TPU runs, after the Coral documentation's table of
# supported operations (QUANTIZE and DEQUANTIZE only at the model's edges).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN",
    "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "DEQUANTIZE", "REDUCE_MAX", "REDUCE_MIN",
    "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM",
    "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "HARD_SWISH", "GATHER",
})


class ExportError(TfSubspaceError):
    """A conversion failed; the message names the mode and the converter's complaint."""


class InputRangeError(TfSubspaceError, ValueError):
    """Calibration/check images are not in the value range the model takes (0-1 vs 0-255)."""


INPUT_RANGES = ("0-1", "0-255")

# Layers that can come before a model's input Rescaling without changing the pixel range at
# inference (resizing, cropping, reshaping; the Random* augmentation layers are identities).
_RANGE_PRESERVING = ("InputLayer", "Resizing", "CenterCrop", "Reshape", "Cropping2D", "ZeroPadding2D")


def _first_layer(model: keras.Model):
    """The first layer of `model` that may change pixel values, looking into nested models."""
    for layer in model.layers:
        name = type(layer).__name__
        if name in _RANGE_PRESERVING or name.startswith("Random"):
            continue
        if isinstance(layer, keras.Model):  # a nested Sequential (e.g. an augmentation block)
            inner = _first_layer(layer)
            if inner is None:
                continue
            return inner
        return layer
    return None


def input_rescaling(model: keras.Model):
    """The Rescaling layer `model` starts with if it maps 0-255 pixels to [0, 1] (scale 1/255)
    or [-1, 1] (scale 1/127.5, offset -1), else None: such a model takes 0-255 images."""
    layer = _first_layer(model)
    if not isinstance(layer, keras.layers.Rescaling):
        return None
    span = 255 * np.abs(np.asarray(keras.ops.convert_to_numpy(layer.scale), dtype=np.float64))
    return layer if np.allclose(span, 1, rtol=0.05) or np.allclose(span, 2, rtol=0.05) else None


def model_input_range(model: keras.Model) -> str:
    """"0-255" if `model` starts with a Rescaling layer that maps 0-255 pixels to a unit
    range (see input_rescaling), else "0-1": the range to calibrate and check it in."""
    return "0-255" if input_rescaling(model) is not None else "0-1"


def resolve_input_range(model: keras.Model, requested: str = "auto") -> tuple[str, str]:
    """(range, why) for a `requested` range of "auto", "0-1" or "0-255" (the scripts'
    --input_range): auto is model_input_range(model); the reason is printed so that a run
    shows which range its numbers were measured in."""
    if requested != "auto":
        if requested not in INPUT_RANGES:
            raise ValueError(f"input range must be auto or one of {INPUT_RANGES}. Received: {requested!r}")
        return requested, "as requested"
    layer = input_rescaling(model)
    if layer is not None:
        return "0-255", f"auto: model {model.name!r} starts with {_describe_rescaling(layer)}"
    return "0-1", f"auto: model {model.name!r} does not start with a Rescaling of 0-255 pixels"


def _describe_rescaling(layer) -> str:
    scale, offset = (np.asarray(keras.ops.convert_to_numpy(v)).round(6).tolist() for v in (layer.scale, layer.offset))
    return f"Rescaling {layer.name!r} (scale={scale}, offset={offset})"


def check_input_range(model: keras.Model, images: np.ndarray, input_range: str | None = None,
                      what: str = "the images") -> None:
    """Raises InputRangeError when `images` are not in the value range `model` takes.

    With `input_range=None` it guesses: a model that starts with Rescaling(1/255) (or 1/127.5)
    takes 0-255 pixels, so images all within [-1, 1] are refused. An explicit "0-1" or
    "0-255" overrides the guess (a Rescaling model really trained on [0, 1] images), and the
    images must then be in that range. `what` names the images in the message.
    """
    lo, hi = float(np.min(images)), float(np.max(images))
    if input_range is None:
        layer = input_rescaling(model)
        if layer is not None and lo >= -1.0 and hi <= 1.0:
            raise InputRangeError(
                f"Model {model.name!r} starts with {_describe_rescaling(layer)}: it takes 0-255 images, but "
                f"{what} are all within [{lo:.3g}, {hi:.3g}]. An int8 file calibrated on them clips every "
                "real input pixel above 1, and a check on them hides it. Pass 0-255 images "
                "(tfsubspace.data.load(..., value_range='0-255'); the scripts' --input_range=0-255), or "
                "input_range='0-1' if this model really takes [0, 1] images.")
        return
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be None or one of {INPUT_RANGES}. Received: input_range={input_range!r}")
    if input_range == "0-255" and hi <= 1.0:
        raise InputRangeError(f"input_range='0-255' was given for model {model.name!r}, but {what} are all "
                              f"within [{lo:.3g}, {hi:.3g}]: load them with value_range='0-255'.")
    if input_range == "0-1" and (lo < -1e-3 or hi > 1 + 1e-3):
        raise InputRangeError(f"input_range='0-1' was given for model {model.name!r}, but {what} span "
                              f"[{lo:.3g}, {hi:.3g}]: load them with value_range='0-1'.")


@dataclasses.dataclass
class ExportedModel:
    """One exported file and its check against the Keras model."""

    mode: str
    path: Path
    size_bytes: int
    max_abs_error: float
    agreement: float
    examples: int
    passed: bool
    message: str = ""

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def with_batch_size(model: keras.Model, batch_size: int = 1) -> keras.Model:
    """The same model (same layers and weights) with a fixed input batch size."""
    if model.inputs[0].shape[0] == batch_size:
        return model
    inputs = [keras.Input(batch_shape=(batch_size, *t.shape[1:]), dtype=t.dtype, name=t.name) for t in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, outputs, name=model.name)


def _images(ds, limit: int | None):
    """Numpy images (float32) from a dataset of images or (images, labels)."""
    out, n = [], 0
    for batch in ds:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = keras.ops.convert_to_numpy(x).astype(np.float32)
        out.append(x)
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not out:
        raise TfSubspaceError("The data set for calibration/checks is empty.")
    images = np.concatenate(out)
    return images[:limit] if limit is not None else images


def convert(model: keras.Model, mode: str, *, calibration=None, io_dtype: str = "int8") -> bytes:
    """Converts `model` (fixed shapes) to TFLite bytes in one of MODES.

    Args:
        calibration: float32 images (N, H, W, C) for full int8 (a few hundred is plenty).
        io_dtype: "int8", "uint8" or "float32": the input/output type of a full-int8 model.
    """
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"Unknown export mode {mode!r}; expected one of {MODES}.")
    if io_dtype not in ("int8", "uint8", "float32"):
        raise ValueError(f"io_dtype must be int8, uint8 or float32. Received: io_dtype={io_dtype!r}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("Full int8 export needs calibration images (a representative data set).")

        batch = model.inputs[0].shape[0] or 1  # the model's fixed batch: calibrate in batches of it

        def representative():
            for start in range(0, len(calibration) - batch + 1, batch):
                yield [calibration[start:start + batch]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_dtype != "float32":
            converter.inference_input_type = getattr(tf, io_dtype)
            converter.inference_output_type = getattr(tf, io_dtype)
    try:
        return converter.convert()
    except Exception as e:  # the converter raises ConverterError and others, with the op in the text
        raise ExportError(f"Converting {model.name!r} to TFLite ({mode}) failed: {e}") from None


class TFLiteRunner:
    """Runs a .tflite file with the LiteRT interpreter, quantizing inputs and outputs as needed."""

    def __init__(self, model: bytes | str | os.PathLike, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        content = model if isinstance(model, bytes) else _read_tflite(model)
        self.source = "the TFLite model" if isinstance(model, bytes) else str(model)
        try:  # a corrupt flatbuffer surfaces as ValueError (UnicodeDecodeError too) or RuntimeError
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
        except (ValueError, RuntimeError, IndexError) as e:
            raise TfSubspaceError(f"Cannot load {self.source}: {e}") from None

    @property
    def batch_size(self) -> int:
        """The file's fixed input batch size."""
        return int(self.input["shape"][0]) or 1

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Outputs (float32) for a batch of images, one invoke per `batch_size` images (the last
        chunk padded with zeros)."""
        outs, n, b = [], len(images), self.batch_size
        try:
            for start in range(0, n, b):
                chunk = images[start:start + b]
                if len(chunk) < b:
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
                self.interpreter.set_tensor(self.input["index"], _quantize(chunk, self.input))
                self.interpreter.invoke()
                outs.append(_dequantize(self.interpreter.get_tensor(self.output["index"]), self.output))
        except (ValueError, RuntimeError) as e:
            raise TfSubspaceError(f"Running {self.source} failed: {e}") from None
        return np.concatenate(outs)[:n]

    def invoke(self) -> None:
        self.interpreter.invoke()


def _read_tflite(path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TfSubspaceError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); it may be truncated or corrupt.")
    return data


def _quantize(x: np.ndarray, detail) -> np.ndarray:
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x.astype(np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def check(tflite: bytes | str | os.PathLike, model: keras.Model, images: np.ndarray) -> tuple[float, float]:
    """(max abs error of the outputs, top-1 agreement) of a TFLite file against `model`."""
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    got = TFLiteRunner(tflite)(images)
    return float(np.max(np.abs(expected - got))), float(np.mean(expected.argmax(-1) == got.argmax(-1)))


def export(model: keras.Model, out_dir: str | os.PathLike, *, modes=MODES, calibration_ds=None, check_ds=None,
           calibration_examples: int = 300, check_examples: int = 500, min_agreement: float = 0.98,
           io_dtype: str = "int8", name: str | None = None, batch_size: int = 1,
           input_range: str | None = None) -> list[ExportedModel]:
    """Exports `model` to `out_dir`/NAME_MODE.tflite for each mode and checks each file.

    Args:
        calibration_ds: images (or (images, labels)) for int8 calibration, in the range the
            model takes (0-255 for a model that starts with Rescaling(1/255)).
        check_ds: images for the checks (defaults to calibration_ds), in the same range.
        min_agreement: top-1 agreement with the Keras model below which a quantized file fails.
        batch_size: the files' fixed input batch (1 for microcontrollers and the Edge TPU;
            files of other batch sizes are named NAME_MODE_bBATCH.tflite).
        input_range: None (guess, see check_input_range), "0-1" or "0-255": the pixel range
            the model takes, which both data sets must be in.
    Returns:
        One ExportedModel per mode; a failed int8 file is still written, marked failed.
    Raises:
        InputRangeError: the images are not in the range the model takes.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1]. Received: min_agreement={min_agreement}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"Unknown export mode {mode!r}; expected one of {MODES}.")
    check_ds = check_ds if check_ds is not None else calibration_ds
    if check_ds is None:
        raise ValueError("export() needs check_ds (or calibration_ds): every file is checked against the model.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
    fixed = with_batch_size(model, batch_size)
    calibration = _images(calibration_ds, calibration_examples) if calibration_ds is not None else None
    images = _images(check_ds, check_examples)
    if calibration is not None:
        check_input_range(model, calibration, input_range, "the calibration images (calibration_ds)")
    check_input_range(model, images, input_range, "the check images (check_ds)")
    out_dir = Path(out_dir)
    name = name or model.name
    results = []
    for mode in modes:
        content = convert(fixed, mode, calibration=calibration, io_dtype=io_dtype)
        suffix = "" if batch_size == 1 else f"_b{batch_size}"
        path = fileio.write_bytes(out_dir / f"{name}_{mode}{suffix}.tflite", content)
        error, agreement = check(content, model, images)
        passed, message = agreement >= min_agreement, ""
        if not passed:
            message = (f"top-1 agreement with the Keras model is {agreement:.2%}, under {min_agreement:.0%}: "
                       "calibrate on more (and more varied) images, or use quantization-aware training "
                       "(scripts/export_tflite.py --qat needs the tfmot extra).")
        results.append(ExportedModel(mode, path, len(content), error, agreement, len(images), passed, message))
    return results


def export_qat(model: keras.Model, out_dir: str | os.PathLike, ds, *, teacher: keras.Model | None = None,
               epochs: int = 2, learning_rate: float = 1e-4, train_examples: int = 10000, check_ds=None,
               check_examples: int = 500, min_agreement: float = 0.98, name: str | None = None,
               python: str | os.PathLike | None = None, verbose: int = 2,
               input_range: str | None = None) -> ExportedModel:
    """Quantization-aware training, then full int8 export (int8 input and output), checked.

    TFMOT needs tf_keras, so this runs in its own process with the Python of the `tfmot`
    environment (`make tfmot`; `python`, else $TFSUBSPACE_TFMOT_PYTHON, else
    .venv-tfmot/bin/python): `model` (and `teacher`) travel as layer specs
    (tfsubspace.peers.bridge), the student is fine-tuned with fake quantization for `epochs` on up
    to `train_examples` images of `ds` (labels unused) against the softened outputs of
    `teacher` (default: the float model itself), and the int8 file is checked against
    `model` like export()'s; both image sets must be in the range the model takes
    (`input_range`, as in export()). Use it when post-training int8 loses too much.
    """
    from tfsubspace.peers import bridge

    python = Path(python or os.environ.get("TFSUBSPACE_TFMOT_PYTHON", ".venv-tfmot/bin/python"))
    if not python.exists():
        raise ExportError(f"Quantization-aware training needs the tfmot environment, and {python} does not exist: "
                          "run `make tfmot` (or set TFSUBSPACE_TFMOT_PYTHON to a Python with the tfmot extra).")
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer. Received: epochs={epochs!r}")
    images = _images(ds, train_examples)
    checks = _images(check_ds if check_ds is not None else ds, check_examples)
    check_input_range(model, images, input_range, "the training images (ds)")
    check_input_range(model, checks, input_range, "the check images (check_ds)")
    out = Path(out_dir) / f"{name or model.name}_int8_qat.tflite"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bridge.save_spec(model, tmp / "student")
        bridge.save_spec(teacher or model, tmp / "teacher")
        np.save(tmp / "images.npy", images)
        fileio.write_json(tmp / "job.json", {
            "kind": "qat", "student": str(tmp / "student"), "teacher": str(tmp / "teacher"),
            "images": str(tmp / "images.npy"), "output": str(out.resolve()), "epochs": epochs,
            "learning_rate": learning_rate, "verbose": verbose})
        code = "import sys; from tfsubspace.peers.tfmot_jobs import run_job; run_job(sys.argv[1])"
        result = subprocess.run([str(python), "-c", code, str(tmp / "job.json")], check=False,
                                capture_output=verbose == 0, text=True)
        if result.returncode != 0:
            raise ExportError(f"Quantization-aware training of {model.name!r} failed (exit {result.returncode})"
                              + (f": {result.stderr[-2000:]}" if result.stderr else "; see its output above."))
    error, agreement = check(out, model, checks)
    passed = agreement >= min_agreement
    message = "" if passed else (f"top-1 agreement with the Keras model is {agreement:.2%} after QAT, under "
                                 f"{min_agreement:.0%}: train longer (epochs) or on more images.")
    return ExportedModel("int8_qat", out, out.stat().st_size, error, agreement, len(checks), passed, message)


# ---------------------------------------------------------------- Edge TPU and microcontrollers


def inspect(tflite: bytes | str | os.PathLike) -> dict:
    """Operators and tensors of a .tflite file: {"ops": [names], "tensors": [{name, type, shape,
    signature, constant}]} (constant: the tensor holds weights)."""
    from tflite_micro.python.tflite_micro import runtime

    content = tflite if isinstance(tflite, bytes) else _read_tflite(tflite)
    model = runtime.convert_bytearray_to_object(bytearray(content))
    schema = runtime.schema_fb
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    ops, tensors = [], []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = runtime.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            ops.append(op_names.get(code, f"CUSTOM_{code}"))
        for t in subgraph.tensors:
            buffer = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
            tensors.append({
                "name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                "type": type_names.get(t.type, str(t.type)),
                "shape": [int(d) for d in (t.shape if t.shape is not None else [])],
                "signature": [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else [])],
                "constant": buffer is not None and buffer.data is not None and len(buffer.data) > 0,
            })
    return {"ops": ops, "tensors": tensors}


def edgetpu_check(tflite: bytes | str | os.PathLike) -> dict:
    """What would keep a .tflite file off the Edge TPU, in the spirit of edgetpu_compiler's report.

    Checks: every tensor int8/uint8 (int32 biases allowed), static shapes, activations with at
    most 3 dimensions larger than 1, and only operators the Edge TPU supports. If `edgetpu_compiler` is on PATH
    and a path is given, it is run too and its output returned.
    """
    info = inspect(tflite)
    problems = []
    for op in sorted(set(info["ops"]) - EDGETPU_OPS):
        problems.append(f"operator {op} is not supported by the Edge TPU")
    for t in info["tensors"]:
        if t["type"] not in ("INT8", "UINT8", "INT32"):
            problems.append(f"tensor {t['name']!r} is {t['type']}, not 8-bit integer")
        if any(d < 0 for d in t["signature"]):
            problems.append(f"tensor {t['name']!r} has a dynamic shape {t['signature']}")
        if not t["constant"] and sum(d > 1 for d in t["shape"]) > 3:
            problems.append(f"tensor {t['name']!r} has more than 3 dimensions larger than 1: {t['shape']}")
    counts = {op: info["ops"].count(op) for op in dict.fromkeys(info["ops"])}
    report = {
        "compatible": not problems,
        "operators": [{"op": op, "count": n, "edgetpu": op in EDGETPU_OPS} for op, n in counts.items()],
        "problems": problems,
        "compiler": None,
    }
    compiler = shutil.which("edgetpu_compiler")
    if compiler and not isinstance(tflite, bytes):
        result = subprocess.run([compiler, "-s", "-o", str(Path(tflite).parent), str(tflite)],
                                capture_output=True, text=True, timeout=600)
        report["compiler"] = {"returncode": result.returncode, "output": result.stdout + result.stderr}
    return report


def format_edgetpu_report(report: dict) -> str:
    lines = ["Operator                     Count      Status", "-" * 52]
    for row in report["operators"]:
        status = "Mapped to Edge TPU" if row["edgetpu"] else "Not supported by the Edge TPU"
        lines.append(f"{row['op']:<28} {row['count']:<10} {status}")
    lines.append("")
    lines.append("Edge TPU compatible." if report["compatible"] else "Not Edge TPU compatible:")
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def micro_arena_bytes(tflite: bytes | str | os.PathLike) -> int:
    """The tensor arena TFLite Micro allocates for a float32 or int8 model (bytes)."""
    import sys

    from tflite_micro.python.tflite_micro import runtime

    content = tflite if isinstance(tflite, bytes) else _read_tflite(tflite)
    interpreter = runtime.Interpreter.from_bytes(content, arena_size=max(len(content) * 10, 1 << 20))
    import ctypes

    libc = ctypes.CDLL(None)
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    try:
        interpreter.print_allocations()  # written by C++ to file descriptor 2
    finally:
        libc.fflush(None)  # the C library's own buffers
        os.dup2(saved, 2)
        os.close(write_fd)
        os.close(saved)
    text = b""
    while chunk := os.read(read_fd, 65536):
        text += chunk
    os.close(read_fd)
    for line in text.decode(errors="replace").splitlines():
        if "Arena allocation total" in line:
            return int(line.split("total")[1].split()[0])
    raise TfSubspaceError("TFLite Micro did not report its arena allocation.")


def write_c_array(tflite: bytes | str | os.PathLike, out_dir: str | os.PathLike, *, name: str = "g_model",
                  arena_bytes: int | None = None) -> tuple[Path, Path]:
    """Writes model_data.cc/.h (the xxd -i style array TFLite Micro firmware includes)."""
    content = tflite if isinstance(tflite, bytes) else _read_tflite(tflite)
    out_dir = Path(out_dir)
    arena = f"\n// Tensor arena measured by tfsubspace with TFLite Micro: {arena_bytes} bytes.\n" \
        f"constexpr int {name}_arena_size = {arena_bytes};\n" if arena_bytes else ""
    header = (f"#ifndef TFSUBSPACE_MODEL_DATA_H_\n#define TFSUBSPACE_MODEL_DATA_H_\n\n"
              f"extern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n{arena}\n"
              f"#endif  // TFSUBSPACE_MODEL_DATA_H_\n")
    rows = [", ".join(f"0x{b:02x}" for b in content[i:i + 12]) for i in range(0, len(content), 12)]
    source = (f'#include "model_data.h"\n\nalignas(16) const unsigned char {name}[] = {{\n  '
              + ",\n  ".join(rows) + f"\n}};\nconst unsigned int {name}_len = {len(content)};\n")
    return (fileio.write_text(out_dir / "model_data.h", header), fileio.write_text(out_dir / "model_data.cc", source))
