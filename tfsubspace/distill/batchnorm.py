"""BatchNormalization statistics: find every BN layer, measure its moving statistics again on
data, tell when a training was too short for them to forget an earlier model, and tell when a
teacher's statistics do not fit the images it is given."""

from __future__ import annotations

import sys

import keras
import numpy as np

from tfsubspace.data.inputs import images_of
from tfsubspace.errors import DataError


def _batchnorm_types() -> tuple[type, ...]:
    """Keras 3's BatchNormalization, and tf_keras's where that is loaded (the TFMOT process)."""
    tf_keras = sys.modules.get("tf_keras")
    return (keras.layers.BatchNormalization,) + ((tf_keras.layers.BatchNormalization,) if tf_keras else ())


def batchnorm_layers(model) -> list:
    """Every BatchNormalization of `model` (Keras 3 or tf_keras), nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, _batchnorm_types()):
            found.append(layer)
        elif hasattr(layer, "layers"):  # a nested model
            found.extend(batchnorm_layers(layer))
    return found


def batchnorm_inputs(model: keras.Model) -> tuple[list, keras.Model | None]:
    """The BatchNormalizations of `model`'s top-level graph that have one input (a shared layer
    has none), and a model from `model`'s inputs to those inputs; ([], None) when there are none."""
    layers = []
    for bn in model.layers:
        if not isinstance(bn, _batchnorm_types()):
            continue
        try:
            bn.input  # noqa: B018 -- raises for a layer called more than once
        except (AttributeError, ValueError):
            continue
        layers.append(bn)
    if not layers:
        return [], None
    return layers, keras.Model(model.inputs, [bn.input for bn in layers])


def channel_axis(bn) -> int:
    """The channel axis of a BatchNormalization (its first, where it has several)."""
    return bn.axis if isinstance(bn.axis, int) else bn.axis[0]


def reestimate_batchnorm(model: keras.Model, ds, batches: int = 50) -> int:
    """Replaces every BatchNormalization's moving statistics by their average over `batches`
    batches of `ds` (images, or (images, labels)), and returns how many batches it used.

    A student sliced from a teacher inherits statistics measured with the teacher's other
    channels present; re-estimating them is what lets it start near the teacher's accuracy.
    """
    layers = batchnorm_layers(model)
    if not layers or batches <= 0:
        return 0
    saved = [bn.momentum for bn in layers]
    used = 0
    try:
        for batch in ds.take(batches):
            x = images_of(batch)
            if not np.isfinite(keras.ops.convert_to_numpy(x)).all():
                raise DataError(
                    f"BatchNormalization re-estimation: batch {used + 1} of the data set holds NaN or "
                    "infinite values; pass finite images."
                )
            for bn in layers:  # moving = running mean of the batch statistics seen so far
                bn.momentum = used / (used + 1)
            model(x, training=True)
            used += 1
    finally:
        for bn, momentum in zip(layers, saved):
            bn.momentum = momentum
    return used


def too_short_for_batchnorm(model: keras.Model, ds, epochs: int, *, left: float = 0.05) -> bool:
    """Whether `epochs` over `ds` leave more than `left` of the BatchNormalization moving
    averages of `model` from before them (momentum ** steps > left; a data set of unknown
    cardinality counts as short). After training that short, the moving statistics still
    describe an earlier model: reestimate_batchnorm() measures them again. After a long
    training the moving averages follow the model closely and measuring them again only adds
    noise, so it is done when training was short (benchmarks/README.md has the measurements)."""
    momenta = [float(bn.momentum) for bn in batchnorm_layers(model)]
    if not momenta or epochs <= 0:
        return False
    steps = int(ds.cardinality())
    return steps <= 0 or max(momenta) ** (steps * epochs) > left


def batchnorm_mismatch(model: keras.Model, images, factor: float = 100.0) -> list[tuple[str, float]]:
    """The BatchNormalizations of `model` whose moving variance does not fit `images`.

    Runs `images` through `model` in inference mode and compares, for every
    BatchNormalization of the top-level graph, the variance of its input (the median over
    channels of batch variance / moving variance) with its moving statistics. A model
    trained on data like `images` gives ratios near 1; images scaled differently from
    training (0-255 against 0-1, a missing mean/std normalization) or an untrained model
    give ratios far from it. Returns (layer name, ratio) for each layer whose ratio is over
    `factor` or under 1/`factor`, shallowest first.
    """
    layers, probe = batchnorm_inputs(model)
    if not layers:
        return []
    outputs = probe(images, training=False)
    found = []
    for bn, x in zip(layers, outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        x = keras.ops.convert_to_numpy(x)
        axis = channel_axis(bn) % x.ndim
        moving = keras.ops.convert_to_numpy(bn.moving_variance)
        with np.errstate(all="ignore"):  # non-finite images give a NaN ratio, skipped below
            variance = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64).var(axis=0)
            ratio = float(np.median((variance + bn.epsilon) / (moving + bn.epsilon)))
        if np.isfinite(ratio) and not 1.0 / factor <= ratio <= factor:  # NaN input is reported elsewhere
            found.append((bn.name, ratio))
    return found
