"""The pixel range a model takes (0-1 or 0-255): detection from its input Rescaling layer, and
checks that calibration and check images are in it (InputRangeError)."""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.errors import TfSubspaceError


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
    """ "0-255" if `model` starts with a Rescaling layer that maps 0-255 pixels to a unit
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


def check_input_range(
    model: keras.Model, images: np.ndarray, input_range: str | None = None, what: str = "the images"
) -> None:
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
                "input_range='0-1' if this model really takes [0, 1] images."
            )
        return
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be None or one of {INPUT_RANGES}. Received: input_range={input_range!r}")
    if input_range == "0-255" and hi <= 1.0:
        raise InputRangeError(
            f"input_range='0-255' was given for model {model.name!r}, but {what} are all "
            f"within [{lo:.3g}, {hi:.3g}]: load them with value_range='0-255'."
        )
    if input_range == "0-1" and (lo < -1e-3 or hi > 1 + 1e-3):
        raise InputRangeError(
            f"input_range='0-1' was given for model {model.name!r}, but {what} span "
            f"[{lo:.3g}, {hi:.3g}]: load them with value_range='0-1'."
        )
