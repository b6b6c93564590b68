"""Consistent, patient teaching: one augmented view for teacher and student, training length
that does not shrink with the data set, and agreement measured on images held out."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfsubspace
from tfsubspace.data import inputs
from tfsubspace.distill import augment, pipeline
from tfsubspace.distill.heldout import top1
from tfsubspace.distill.trainer import StudentTrainer


def tiny_teacher():
    x_in = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="c1")(x_in)
    x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(x_in, keras.layers.Dense(4, name="out")(x), name="tiny")


@pytest.fixture(scope="module")
def teacher_and_images():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).random((160, 12, 12, 1)).astype("float32")
    labels = (images[:, :6].mean(axis=(1, 2, 3)) * 8).astype("int32") % 4
    teacher = tiny_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(images, labels, batch_size=16, epochs=3, verbose=0)
    return teacher, images


def test_augment_specs():
    assert augment.parse("auto", (28, 28, 1)) == ("mixup",)  # no mirror images of digits
    assert augment.parse("auto", (32, 32, 3)) == ("flip", "mixup")
    assert augment.parse("auto", (64,)) == ()
    assert augment.parse("none", (32, 32, 3)) == ()
    assert augment.parse("crop, cutmix", (32, 32, 3)) == ("crop", "cutmix")
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment.parse("crop,rotate", (32, 32, 3))
    layer = augment.augmenter("crop,flip,mixup", (12, 12, 1), seed=3)
    x = np.random.default_rng(1).random((8, 12, 12, 1)).astype("float32")
    a, b = layer(x, training=True), layer(x, training=True)
    assert a.shape == x.shape and not np.allclose(a, x) and not np.allclose(a, b)  # a fresh view each call


def test_teacher_and_student_see_the_same_view(teacher_and_images):
    _, images = teacher_and_images
    x_in = keras.Input((12, 12, 1))  # no BatchNormalization: training and inference compute alike
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(x_in))
    teacher = keras.Model(x_in, keras.layers.Dense(4)(hidden))
    twin = keras.models.clone_model(teacher)
    twin.set_weights(teacher.get_weights())
    view = augment.augmenter("crop,flip,mixup", (12, 12, 1), seed=0)
    trainer = StudentTrainer(twin, teacher, kd_weight=1.0, augment=view)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # the twin stays the teacher's copy
    logs = trainer.fit(tf.data.Dataset.from_tensor_slices(images).batch(16), epochs=1, verbose=0).history
    assert logs["kd_loss"][0] < 1e-6 and logs["agreement"][0] == 1.0  # separate views would disagree
    with pytest.raises(ValueError, match="augment is for training on a teacher alone"):
        StudentTrainer(twin, teacher, label_weight=1.0, augment=view)


def test_patient_default_length():
    config = pipeline.CompressionConfig()
    assert pipeline.distill_epochs(config, 469) == 5  # 60,000 images in batches of 128: 2,345 steps
    assert pipeline.distill_epochs(config, 40) == 50  # 5,000 images in batches of 128: 2,000 steps
    assert pipeline.distill_epochs(pipeline.CompressionConfig(epochs=3), 40) == 3
    assert pipeline.distill_epochs(pipeline.CompressionConfig(steps=100), 40) == 3
    with pytest.raises(ValueError, match="Give epochs or steps, not both"):
        tfsubspace.compress(tiny_teacher(), np.zeros((4, 12, 12, 1), "float32"), epochs=2, steps=10)


@pytest.mark.slow
def test_heldout_agreement_is_logged_and_recovery_keeps_its_best_epoch(teacher_and_images, tmp_path):
    teacher, images = teacher_and_images
    ds = tf.data.Dataset.from_tensor_slices(images).batch(16)
    result = tfsubspace.compress(
        teacher,
        ds,
        work_dir=tmp_path,
        width_ratio=0.5,
        multiple=2,
        steps=30,
        recover_epochs=4,
        patience=2,
        holdout=0.2,
        stats_batches=2,
        bn_batches=0,
        adapt="none",  # the images as they are held out (tests/test_adapt.py holds out adapted copies too)
        verbose=0,
    )
    report = result.report
    assert 10 <= report["heldout_images"] <= 60
    batches = math.ceil((160 - report["heldout_images"]) / 16)
    assert report["epochs"] == math.ceil(30 / batches)  # steps=30, in whole epochs
    distill_log = report["agreement_in_training"]["distill"]
    assert (
        distill_log["epochs"] == report["epochs"]
        and 0 <= distill_log["heldout"] <= 1
        and 0 <= distill_log["train"] <= 1
    )
    recover_log = report["agreement_in_training"]["recover"]
    assert recover_log["epochs"] <= 4 and recover_log["best_epoch"] <= recover_log["epochs"]
    # the held-out images are the same on every run (by their values): the student ends at the best epoch
    _, heldout = inputs.split_holdout(ds, 0.2)
    assert len(heldout) == report["heldout_images"]
    agreement = float(np.mean(top1(result.student, heldout) == top1(teacher, heldout)))
    assert agreement == pytest.approx(recover_log["best_heldout"])
    assert "heldout_agreement" in (tmp_path / "distill.csv").read_text().splitlines()[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["options"]["augment"] == "auto" and manifest["options"]["holdout"] == 0.2
