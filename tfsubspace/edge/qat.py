"""Quantization-aware training in the tfmot environment's process, then full int8 of its best epoch (export_qat)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.distill.trainer import ends_in_softmax
from tfsubspace.edge.autoint8 import DEFAULT_MIN_AGREEMENT, int8_step, verdict_note
from tfsubspace.edge.convert import ExportError
from tfsubspace.edge.export import ExportedModel, _images
from tfsubspace.edge.graphedit import predict
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
    check_examples: int = 1000,
    calibration_examples: int = 300,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    name: str | None = None,
    python: str | os.PathLike | None = None,
    verbose: int = 2,
    input_range: str | None = None,
) -> ExportedModel:
    """Quantization-aware training, then full int8 export (int8 input and output), checked.

    TFMOT needs tf_keras, so the training runs in its own process with the Python of the `tfmot`
    environment (`make tfmot`; `python`, else $TFSUBSPACE_TFMOT_PYTHON, else
    .venv-tfmot/bin/python): `model` (and `teacher`) travel as layer specs
    (tfsubspace.peers.bridge; a SeparableConv2D split into its depthwise and pointwise
    convolutions, tfsubspace.edge.split), the student is fine-tuned with fake quantization for `epochs` on up
    to `train_examples` images of `ds` (labels unused) against the softened outputs of
    `teacher` (default: the float model itself), and its trained float weights come back after
    every epoch. Each epoch's weights, and the model's own before training (epoch 0), are
    converted here by post-training int8 (autoint8.int8_step, calibrated on the first
    `calibration_examples` training images) and checked against `model` like export()'s; the
    file of highest agreement is kept (the earliest of equals), so training never leaves a file
    worse than the one it started from. Both image sets must be in the range the model takes
    (`input_range`, as in export()). Use it when post-training int8 loses too much.

    Returns:
        ExportedModel "int8_qat" with every epoch's check in `steps` (step "qat_K").
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
    split = split_separable(model)[0]  # exact; TFMOT's own split can fail
    expected = predict(model, checks)
    calibration = images[:calibration_examples]
    steps = [int8_step("qat_0", model, expected, calibration, checks, min_agreement=min_agreement)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bridge.save_spec(split, tmp / "student")
        bridge.save_spec(teacher or model, tmp / "teacher")
        np.save(tmp / "images.npy", images)
        fileio.write_json(
            tmp / "job.json",
            {
                "kind": "qat",
                "student": str(tmp / "student"),
                "teacher": str(tmp / "teacher"),
                "images": str(tmp / "images.npy"),
                "weights_dir": str(tmp / "weights"),
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
        for epoch, seconds in enumerate(json.loads((tmp / "weights" / "seconds.json").read_text()), start=1):
            trained = keras.models.clone_model(split)
            bridge.load_weights(trained, tmp / "weights" / f"epoch_{epoch}.npz")
            diff = float(np.max(np.abs(predict(trained, checks) - expected)))
            steps.append(
                int8_step(
                    f"qat_{epoch}",
                    trained,
                    expected,
                    calibration,
                    checks,
                    min_agreement=min_agreement,
                    rewrite_seconds=seconds,  # of training, up to the end of this epoch
                    float_max_abs_diff=diff,
                    notes=[f"{len(images)} images, epoch {epoch} of {epochs}, learning rate {learning_rate:g}"],
                )
            )
    kept = max(steps, key=lambda step: step.agreement)
    fileio.write_bytes(out, kept.content)
    passed = kept.agreement >= min_agreement
    message = (
        ""
        if passed
        else (
            f"top-1 agreement with the Keras model is {kept.agreement:.2%} after QAT (epoch "
            f"{steps.index(kept)} of {epochs} kept), under {min_agreement:.0%}: train longer (epochs) or on more "
            "images."
        )
    )
    message = (message + verdict_note(kept.agreement, len(checks), min_agreement)).strip()
    return ExportedModel(
        "int8_qat",
        out,
        len(kept.content),
        kept.max_abs_error,
        kept.agreement,
        len(checks),
        passed,
        message,
        steps=[step.summary() for step in steps],
    )
