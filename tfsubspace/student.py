"""Student construction: the teacher's topology at chosen widths, started from the teacher."""

from __future__ import annotations

import keras

from tfsubspace import surgery
from tfsubspace.analysis import ChannelAnalysis

INITS = ("teacher", "random")


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization of `model`, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(batchnorm_layers(layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


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
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for bn in layers:  # moving = running mean of the batch statistics seen so far
                bn.momentum = used / (used + 1)
            model(x, training=True)
            used += 1
    finally:
        for bn, momentum in zip(layers, saved):
            bn.momentum = momentum
    return used


def build_student(teacher: keras.Model, plan: surgery.PruningPlan, *, init: str = "teacher", ds=None,
                  bn_batches: int = 50, analysis: ChannelAnalysis | None = None) -> keras.Model:
    """The student of `plan`: the teacher sliced to the kept channels (init='teacher'), or
    the same architecture freshly initialised (init='random'); BN statistics re-estimated on
    `ds` when given."""
    if init not in INITS:
        raise ValueError(f"Unknown student init {init!r}; expected one of {INITS}.")
    student = surgery.apply_plan(teacher, plan, analysis=analysis).model
    if init == "random":
        student = keras.models.clone_model(student)
    if ds is not None:
        reestimate_batchnorm(student, ds, bn_batches)
    return student
