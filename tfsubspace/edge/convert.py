"""Keras -> TFLite conversion: a fixed input batch (with_batch_size) and one file per mode (convert)."""

from __future__ import annotations

import keras

from tfsubspace.edge.shared_ranges import repair_shared_ranges
from tfsubspace.errors import TfSubspaceError

MODES = ("float32", "float16", "dynamic", "int8", "int16x8")
# exported unless asked otherwise: int16x8 (16-bit activations, int8 weights) is for a model that
# full int8 cannot hold; LiteRT's CPU delegate (XNNPACK) does not run it, TFLite Micro does
DEFAULT_MODES = ("float32", "float16", "dynamic", "int8")


class ExportError(TfSubspaceError):
    """A conversion failed; the message names the mode and the converter's complaint."""


def with_batch_size(model: keras.Model, batch_size: int = 1) -> keras.Model:
    """The same model (same layers and weights) with a fixed input batch size."""
    if model.inputs[0].shape[0] == batch_size:
        return model
    inputs = [keras.Input(batch_shape=(batch_size, *t.shape[1:]), dtype=t.dtype, name=t.name) for t in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, outputs, name=model.name)


def convert(
    model: keras.Model, mode: str, *, calibration=None, io_dtype: str = "int8", repair_ranges: bool = True
) -> bytes:
    """Converts `model` (fixed shapes) to TFLite bytes in one of MODES.

    Args:
        calibration: float32 images (N, H, W, C) for int8 and int16x8 (a few hundred is plenty).
        io_dtype: "int8", "uint8" or "float32": the input/output type of a full-int8 model
            (int16x8 files keep float32 inputs and outputs).
        repair_ranges: give each input of an in-place ADD/SUB/MUL of an int8 file its own range
            where TFLite's calibrator gave it the union with the op's output's (shared_ranges.py);
            False keeps the converter's file as it is.
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
    if mode in ("int8", "int16x8"):
        if calibration is None or not len(calibration):
            raise ValueError(f"{mode} export needs calibration images (a representative data set).")

        batch = model.inputs[0].shape[0] or 1  # the model's fixed batch: calibrate in batches of it

        def representative():
            for start in range(0, len(calibration) - batch + 1, batch):
                yield [calibration[start : start + batch]]

        converter.representative_dataset = representative
    if mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    if mode == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_dtype != "float32":
            converter.inference_input_type = getattr(tf, io_dtype)
            converter.inference_output_type = getattr(tf, io_dtype)
    try:
        content = converter.convert()
    except Exception as e:  # the converter raises ConverterError and others, with the op in the text
        raise ExportError(f"Converting {model.name!r} to TFLite ({mode}) failed: {e}") from None
    if mode == "int8" and repair_ranges:
        content = repair_shared_ranges(content, lambda: convert(model, "float32"), calibration)[0]
    return content
