"""Quantization-aware training and full int8 export through the tfmot environment's process (export_qat)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.distill.trainer import ends_in_softmax
from tfsubspace.edge.autoint8 import DEFAULT_MIN_AGREEMENT
from tfsubspace.edge.convert import ExportError
from tfsubspace.edge.export import ExportedModel, _images, check
from tfsubspace.edge.input_range import check_input_range
from tfsubspace.edge.split import split_separable


def export_qat(
    model: keras.Model,
    out_dir: str | os.PathLike,
    ds,
    *,
    teacher: keras.Model | None = None,
    epochs: int = 2,
    learning_rate: float = 1e-4,
    train_examples: int = 10000,
    check_ds=None,
    check_examples: int = 500,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    name: str | None = None,
    python: str | os.PathLike | None = None,
    verbose: int = 2,
    input_range: str | None = None,
) -> ExportedModel:
    """Quantization-aware training, then full int8 export (int8 input and output), checked.

    TFMOT needs tf_keras, so this runs in its own process with the Python of the `tfmot`
    environment (`make tfmot`; `python`, else $TFSUBSPACE_TFMOT_PYTHON, else
    .venv-tfmot/bin/python): `model` (and `teacher`) travel as layer specs
    (tfsubspace.peers.bridge; a SeparableConv2D split into its depthwise and pointwise
    convolutions, tfsubspace.edge.split), the student is fine-tuned with fake quantization for `epochs` on up
    to `train_examples` images of `ds` (labels unused) against the softened outputs of
    `teacher` (default: the float model itself), and the int8 file is checked against
    `model` like export()'s; both image sets must be in the range the model takes
    (`input_range`, as in export()). Use it when post-training int8 loses too much.
    """
    from tfsubspace.peers import bridge

    python = Path(python or os.environ.get("TFSUBSPACE_TFMOT_PYTHON", ".venv-tfmot/bin/python"))
    if not python.exists():
        raise ExportError(
            f"Quantization-aware training needs the tfmot environment, and {python} does not exist: "
            "run `make tfmot` (or set TFSUBSPACE_TFMOT_PYTHON to a Python with the tfmot extra)."
        )
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer. Received: epochs={epochs!r}")
    images = _images(ds, train_examples)
    checks = _images(check_ds if check_ds is not None else ds, check_examples)
    check_input_range(model, images, input_range, "the training images (ds)")
    check_input_range(model, checks, input_range, "the check images (check_ds)")
    out = Path(out_dir) / f"{name or model.name}_int8_qat.tflite"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bridge.save_spec(split_separable(model)[0], tmp / "student")  # exact; TFMOT's own split can fail
        bridge.save_spec(teacher or model, tmp / "teacher")
        np.save(tmp / "images.npy", images)
        fileio.write_json(
            tmp / "job.json",
            {
                "kind": "qat",
                "student": str(tmp / "student"),
                "teacher": str(tmp / "teacher"),
                "images": str(tmp / "images.npy"),
                "output": str(out.resolve()),
                "epochs": epochs,
                "learning_rate": learning_rate,
                "probabilities": ends_in_softmax(teacher or model),
                "verbose": verbose,
            },
        )
        code = "import sys; from tfsubspace.peers.tfmot_jobs import run_job; run_job(sys.argv[1])"
        # oneDNN's CPU kernels crashed (SIGSEGV) training the fer mini-Xception's QAT graph: off unless asked for
        env = {"TF_ENABLE_ONEDNN_OPTS": "0", **os.environ}
        result = subprocess.run(
            [str(python), "-c", code, str(tmp / "job.json")],
            check=False,
            capture_output=verbose == 0,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise ExportError(
                f"Quantization-aware training of {model.name!r} failed (exit {result.returncode})"
                + (f": {result.stderr[-2000:]}" if result.stderr else "; see its output above.")
            )
    error, agreement = check(out, model, checks)
    passed = agreement >= min_agreement
    message = (
        ""
        if passed
        else (
            f"top-1 agreement with the Keras model is {agreement:.2%} after QAT, under "
            f"{min_agreement:.0%}: train longer (epochs) or on more images."
        )
    )
    return ExportedModel("int8_qat", out, out.stat().st_size, error, agreement, len(checks), passed, message)
