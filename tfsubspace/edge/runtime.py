"""Reading and running .tflite files: the LiteRT runner (TFLiteRunner), input quantization and
output dequantization, and inspect() for a file's operators and tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tfsubspace.errors import TfSubspaceError


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
            raise TfSubspaceError(
                f"Cannot load {self.source}: {str(e).rstrip('.')}{_why_xnnpack_fails(content, e)}"
            ) from None

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
                chunk = images[start : start + b]
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


def _why_xnnpack_fails(content: bytes, error: Exception) -> str:
    """Where XNNPACK refuses an int8 file: the tensors whose scale is too small to run (a tensor
    that is zero on every calibration image, e.g. a dead ReLU, gets a scale near 0), if any."""
    if "XNNPACK" not in str(error):
        return ""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        plain = Interpreter(
            model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    except (ValueError, RuntimeError):
        return ""
    tiny = [
        t["name"]
        for t in plain.get_tensor_details()
        if t["dtype"] in (np.int8, np.uint8)
        and len(t["quantization_parameters"]["scales"]) == 1
        and 0 < t["quantization_parameters"]["scales"][0] < 1e-6
    ]
    if not tiny:
        return ""
    return (
        f". Tensor(s) {tiny} have int8 scales under 1e-6: they were (nearly) zero on every calibration image, "
        "which XNNPACK cannot run. A layer that outputs only zeros is dead: remove it, or calibrate with images "
        "that reach it."
    )


def _read_tflite(path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise TfSubspaceError(
            f"{path} is not a TFLite flatbuffer (no TFL3 identifier); it may be truncated or corrupt."
        )
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
            tensors.append(
                {
                    "name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                    "type": type_names.get(t.type, str(t.type)),
                    "shape": [int(d) for d in (t.shape if t.shape is not None else [])],
                    "signature": [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else [])],
                    "constant": buffer is not None and buffer.data is not None and len(buffer.data) > 0,
                }
            )
    return {"ops": ops, "tensors": tensors}
