"""The Edge TPU compatibility check of a .tflite file (edgetpu_check) and its printed report."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tfsubspace.edge.runtime import inspect

# TFLite builtin operators the Edge TPU runs, after the Coral documentation's table of
# supported operations (QUANTIZE and DEQUANTIZE only at the model's edges).
EDGETPU_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "DEQUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "SQUARED_DIFFERENCE",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
        "HARD_SWISH",
        "GATHER",
    }
)


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
        result = subprocess.run(
            [compiler, "-s", "-o", str(Path(tflite).parent), str(tflite)], capture_output=True, text=True, timeout=600
        )
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
