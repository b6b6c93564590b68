"""Student construction: the teacher's topology at chosen widths, started from the teacher."""

from __future__ import annotations

import keras

from tfsubspace.distill.batchnorm import reestimate_batchnorm
from tfsubspace.prune import surgery
from tfsubspace.prune.analysis import ChannelAnalysis
from tfsubspace.prune.plan import PruningPlan

INITS = ("teacher", "random")


def build_student(
    teacher: keras.Model,
    plan: PruningPlan,
    *,
    init: str = "teacher",
    ds=None,
    bn_batches: int = 50,
    analysis: ChannelAnalysis | None = None,
) -> keras.Model:
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
