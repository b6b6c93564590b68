"""No silent wrong result: what compress() accepts, what it refuses, and its work directory.

Every test here names a way compress() could return a wrong student (or a misleading report)
without a word, and checks that it now either does the right thing or says what is wrong.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfsubspace
from tfsubspace import fileio
from tfsubspace.data import inputs
from tfsubspace.distill import trainer
from tfsubspace.errors import DataError, TfSubspaceError, UnsupportedModelError, WorkDirError
from tfsubspace.train import workdir

FAST = dict(width_ratio=0.5, multiple=2, epochs=1, recover_epochs=0, stats_batches=2, bn_batches=2, verbose=0)


def tiny_teacher(softmax=False, name="tiny"):
    inputs_ = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="c1")(inputs_)
    x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
    x = keras.layers.MaxPooling2D(2, name="p1")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc")(x)
    out = keras.layers.Dense(4, activation="softmax" if softmax else None, name="out")(x)
    return keras.Model(inputs_, out, name=name)


@pytest.fixture(scope="module")
def teacher_and_images():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((96, 12, 12, 1)).astype("float32")
    labels = (images[:, :6].mean(axis=(1, 2, 3)) * 8).astype("int32") % 4
    teacher = tiny_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    teacher.fit(images, labels, batch_size=16, epochs=2, verbose=0)
    return teacher, images, labels


def batched(images, batch=16):
    return tf.data.Dataset.from_tensor_slices(images).batch(batch)


# ----------------------------------------------------------------- the work directory


@pytest.mark.slow
def test_a_rerun_with_other_options_teacher_or_data_is_refused(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    first = tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)
    assert json.loads((tmp_path / "manifest.json").read_text())["options"]["width_ratio"] == 0.5
    with pytest.raises(WorkDirError, match=r"options\.width_ratio: 0\.5 -> 0\.75"):
        tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **{**FAST, "width_ratio": 0.75})
    other = keras.models.clone_model(teacher)
    with pytest.raises(WorkDirError, match=r"teacher\.weights"):
        tfsubspace.compress(other, batched(images), work_dir=tmp_path, **FAST)
    with pytest.raises(WorkDirError, match=r"data\.fingerprint"):
        tfsubspace.compress(teacher, batched(images[::-1] * 0.5), work_dir=tmp_path, **FAST)
    # the same inputs resume (in another order: the fingerprint does not depend on it) ...
    again = tfsubspace.compress(teacher, batched(images).unbatch().shuffle(96).batch(16), work_dir=tmp_path, **FAST)
    assert again.report["stage_seconds"] == {}
    assert again.student.count_params() == first.student.count_params()
    # ... and overwrite=True starts over with the new options
    redone = tfsubspace.compress(
        teacher, batched(images), work_dir=tmp_path, overwrite=True, **{**FAST, "width_ratio": 0.75}
    )
    assert redone.report["stage_seconds"] and redone.report["widths"]["c1"]["subspace"] == 6


def test_damaged_stage_files_are_named_not_reused(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)
    path = tmp_path / "student_init.keras"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TfSubspaceError, match="student_init.keras"):
        tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)
    # a file with NaN weights (written behind tfsubspace's back) is refused too
    poisoned = keras.models.load_model(tmp_path / "student_distilled.keras")
    poisoned.layers[1].kernel.assign(np.full(poisoned.layers[1].kernel.shape, np.nan, "float32"))
    path.write_bytes(data)
    poisoned.save(tmp_path / "student_distilled.keras")
    with pytest.raises(WorkDirError, match="student_distilled.keras holds non-finite values"):
        tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)
    (tmp_path / "spectra.json").write_text("{not json")
    (tmp_path / "student_distilled.keras").unlink()
    with pytest.raises(WorkDirError, match="spectra.json is missing or damaged"):
        tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    with workdir.WorkDir(tmp_path), pytest.raises(WorkDirError, match=f"in use by process {os.getpid()}"):
        workdir.WorkDir(tmp_path).__enter__()
    code = textwrap.dedent(f"""
        import os, signal
        from tfsubspace.train import workdir
        with workdir.WorkDir({str(tmp_path)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / workdir.LOCK).exists()  # left behind by the killed process
    with workdir.WorkDir(tmp_path):
        pass


def test_stage_files_without_a_manifest_are_not_adopted(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    (tmp_path / "student.keras").write_bytes(b"from an older run")
    with pytest.raises(WorkDirError, match="holds stage files but no manifest.json"):
        tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)


# ----------------------------------------------------------------- data of unknown length


def test_a_data_set_of_unknown_length_gets_a_schedule_over_every_step(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    filtered = batched(images).filter(lambda x: True)
    assert int(filtered.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    student = keras.models.clone_model(teacher)
    kd = trainer.StudentTrainer(student, teacher, kd_weight=1.0)
    trainer.train_student(kd, filtered, epochs=3, learning_rate=1e-3, work_dir=tmp_path, name="kd", verbose=0)
    schedule = kd.optimizer._learning_rate  # the CosineDecay the loop compiled
    assert schedule.decay_steps == 3 * 6  # 6 batches counted, not 1 (cardinality -2)
    assert int(kd.optimizer.iterations) == 18
    assert float(schedule(12)) > 1e-4  # not spent after the first epoch


def test_an_infinite_data_set_needs_steps_per_epoch(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    with pytest.raises(DataError, match="infinite.*steps_per_epoch"):
        tfsubspace.compress(teacher, batched(images).repeat(), **FAST)
    result = tfsubspace.compress(teacher, batched(images).repeat(), steps_per_epoch=3, work_dir=tmp_path, **FAST)
    rows = (tmp_path / "distill.csv").read_text().splitlines()
    assert len(rows) == 2 and result.report["student"]["params"] < teacher.count_params()


def test_train_classifier_counts_a_data_set_of_unknown_length(teacher_and_images, tmp_path):
    _, images, labels = teacher_and_images
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).filter(lambda x, y: True).batch(32)
    model = tiny_teacher()
    result = tfsubspace.train_classifier(model, ds, ds, epochs=2, work_dir=tmp_path, verbose=0)
    assert int(model.optimizer.iterations) == 6 and result.epochs == 2


# ----------------------------------------------------------------- non-finite values


def test_a_nan_image_in_a_later_batch_is_named_before_anything_is_written(teacher_and_images, tmp_path):
    teacher, images, _ = teacher_and_images
    poisoned = images.copy()
    poisoned[5 * 16 + 3, 2, 2, 0] = np.nan  # batch 6, past stats_batches=4
    with pytest.raises(DataError, match=r"ds: batch 6 \(image 3 of it\) holds NaN"):
        tfsubspace.compress(teacher, batched(poisoned), work_dir=tmp_path, **{**FAST, "stats_batches": 4})
    assert not list(tmp_path.glob("*.keras"))
    with pytest.raises(DataError, match="batch 6 of the data set holds NaN"):
        tfsubspace.reestimate_batchnorm(keras.models.clone_model(teacher), batched(poisoned), 10)


def test_no_file_with_a_non_finite_weight_is_written(teacher_and_images, tmp_path):
    teacher, images, labels = teacher_and_images
    model = keras.models.clone_model(teacher)
    model.set_weights(teacher.get_weights())
    model.get_layer("fc").kernel.assign(np.full(model.get_layer("fc").kernel.shape, np.inf, "float32"))
    with pytest.raises(TfSubspaceError, match="Not saving .*fc.*NaN or infinite"):
        fileio.save_model(model, tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()
    # Keras calls on_epoch_end after a NaN stop: the checkpoint must not keep that epoch
    bad = np.concatenate([images, np.full((16, 12, 12, 1), 1e38, "float32")])
    ds = tf.data.Dataset.from_tensor_slices((bad, np.concatenate([labels, labels[:16]]))).batch(16)
    fresh = tiny_teacher()
    with pytest.raises(FloatingPointError, match=r"training: the loss became NaN or infinite at epoch 1, batch 7"):
        tfsubspace.train_classifier(fresh, ds, ds, epochs=2, work_dir=tmp_path / "w", verbose=0)
    assert not list((tmp_path / "w" / "backup").glob("*.h5"))


# ----------------------------------------------------------------- budgets and teachers


def test_budgets_are_ratios_or_counts_and_a_missed_one_is_said(teacher_and_images):
    teacher, images, _ = teacher_and_images
    for bad in (2.0, 1, 0, -0.5, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="target_params must be"):
            tfsubspace.compress(teacher, batched(images), **{**FAST, "target_params": bad})
    with pytest.warns(UserWarning, match=r"target_params=2: the student has .* over the budget of 2"):
        result = tfsubspace.compress(teacher, batched(images), **{**FAST, "target_params": 2, "lasso": 0.0})
    assert result.report["budgets"]["params"] == {"target": 2, "reached": result.student.count_params(), "met": False}
    assert "params budget | | 2: NOT met" in result.summary()


def test_a_softmax_teacher_is_distilled_from_its_logits(teacher_and_images):
    teacher, images, _ = teacher_and_images
    with_softmax = tiny_teacher(softmax=True, name="tiny")
    with_softmax.set_weights(teacher.get_weights())
    logits = trainer.logits_output(with_softmax)
    probe = keras.Model(with_softmax.inputs, logits)
    np.testing.assert_allclose(probe(images[:8]), teacher(images[:8]), atol=1e-5)
    options = {**FAST, "epochs": 2, "kd_weight": 1.0, "tap_weight": 0.0, "lasso": 0.0}
    a = tfsubspace.compress(teacher, batched(images), **options).student
    b = tfsubspace.compress(with_softmax, batched(images), **options).student
    b_logits = keras.Model(b.inputs, trainer.logits_output(b))
    np.testing.assert_allclose(b_logits(images[:16]), a(images[:16]), atol=1e-4)
    np.testing.assert_allclose(b(images[:16]), keras.ops.softmax(a(images[:16])), atol=1e-5)


# ----------------------------------------------------------------- what compress() accepts


def test_arrays_tuples_and_uint8_are_accepted_without_a_work_dir(teacher_and_images, capsys):
    teacher, images, labels = teacher_and_images
    uint8 = (images * 255).astype("uint8")
    ds = inputs.image_dataset(uint8, teacher, "ds")
    assert ds.element_spec.dtype == tf.float32 and float(next(iter(ds)).numpy().max()) > 1.0  # values kept
    one_hot = np.eye(4, dtype="float32")[labels]
    result = tfsubspace.compress(
        teacher,
        (images, labels),
        eval_ds=(images, one_hot),
        **{**FAST, "verbose": 1, "stats_batches": 100, "adapt": "none"},  # 3 batches, not 3 and their copies
    )
    assert result.paths == {}  # nothing points into a deleted folder
    assert "| params |" in result.summary()
    out = capsys.readouterr().out
    assert "3/3" in out and "/100" not in out  # the statistics' progress counts the batches there are
    assert "| params |" in out  # the before/after table ends a verbose run
    assert 0 <= result.report["student"]["accuracy"] <= 1
    # the student is compiled like the teacher: fit works at once
    assert result.student.compiled
    result.student.fit(images[:16], labels[:16], epochs=1, verbose=0)


def test_what_is_refused_before_any_training(teacher_and_images):
    teacher, images, labels = teacher_and_images
    ds = batched(images)
    for option, value in (
        ("multiple", 2.5),
        ("epochs", 1.5),
        ("epochs", "2"),
        ("verbose", "loud"),
        ("lasso", float("nan")),
        ("steps_per_epoch", 0),
    ):
        with pytest.raises(ValueError, match=f"{option} must be"):
            tfsubspace.compress(teacher, ds, **{option: value})
    with pytest.raises(DataError, match=r"yields images of shape \(None, 28, 28, 1\), but model 'tiny' takes"):
        tfsubspace.compress(teacher, np.zeros((4, 28, 28, 1), "float32"))
    with pytest.raises(DataError, match="yields dicts"):
        tfsubspace.compress(teacher, tf.data.Dataset.from_tensor_slices({"image": images}).batch(8))
    with pytest.raises(DataError, match="eval_ds is empty"):
        tfsubspace.compress(teacher, ds, eval_ds=ds.take(0).map(lambda x: (x, 0)))
    with pytest.raises(DataError, match="ds is empty"):
        tfsubspace.compress(teacher, ds.take(0))
    with pytest.raises(DataError, match="label 7 is outside the model's 4 classes"):
        tfsubspace.compress(teacher, ds, eval_ds=(images, labels + 7 - labels.max()))
    a, b = keras.Input((12, 12, 1)), keras.Input((12, 12, 1))
    two_in = keras.Model([a, b], keras.layers.Add()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)]))
    with pytest.raises(UnsupportedModelError, match="has 2 inputs"):
        tfsubspace.compress(two_in, ds)
    two_out = keras.Model(teacher.inputs, [teacher.outputs[0], teacher.get_layer("fc").output])
    with pytest.raises(UnsupportedModelError, match="has 2 outputs"):
        tfsubspace.compress(two_out, ds)
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny_teacher(name="mixed")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    with pytest.raises(UnsupportedModelError, match="computes in"):
        tfsubspace.compress(mixed, ds)


@pytest.mark.slow
def test_a_resumed_run_says_so(teacher_and_images, tmp_path, capsys):
    teacher, images, _ = teacher_and_images
    tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **FAST)
    (tmp_path / "student_distilled.keras").unlink()
    result = tfsubspace.compress(teacher, batched(images), work_dir=tmp_path, **{**FAST, "verbose": 2})
    out = capsys.readouterr().out
    assert f"resuming the run in {tmp_path}" in out and "student_init: reusing" in out
    assert result.paths["spectra"].exists()  # also on a resumed run
