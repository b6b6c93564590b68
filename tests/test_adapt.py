"""Images from another domain, moved toward the teacher's BatchNormalization statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfsubspace
from tfsubspace.distill import adapt
from tfsubspace.distill.batchnorm import batchnorm_inputs
from tfsubspace.models import stats

pytestmark = pytest.mark.auto_adapt  # compress()'s real threshold (tests/conftest.py)


def bn_teacher(shift=0.0):
    """Conv -> BN -> ReLU twice; BN statistics set as if trained on images of mean 0.5 + shift."""
    keras.utils.set_random_seed(0)
    x_in = keras.Input((10, 10, 1))
    x = x_in
    for i, width in enumerate((6, 8)):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"c{i}")(x)
        x = keras.layers.ReLU(name=f"r{i}")(keras.layers.BatchNormalization(name=f"b{i}")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(x_in, keras.layers.Dense(3, name="out")(x), name="bn_teacher")
    domain = np.random.default_rng(1).uniform(0, 1, (400, 10, 10, 1)).astype("float32") * 0.5 + 0.25 + shift
    probe = keras.Model(teacher.inputs, [teacher.get_layer("b0").input, teacher.get_layer("b1").input])
    for name in ("b0", "b1"):  # moving statistics of the teacher's own domain
        bn = teacher.get_layer(name)
        seen = probe([domain])[int(name[1])].numpy().reshape(-1, bn.moving_mean.shape[0])
        bn.moving_mean.assign(seen.mean(0))
        bn.moving_variance.assign(seen.var(0))
    return teacher, domain


def sparse_images(n, seed):
    """Another domain: dark images with a few bright pixels (digits to a clothing teacher), in [0, 1]."""
    return (np.random.default_rng(seed).uniform(0, 1, (n, 10, 10, 1)) > 0.85).astype("float32")


def test_adapted_images_have_the_teachers_statistics_and_stay_in_range():
    teacher, domain = bn_teacher()
    other = sparse_images(300, seed=2)
    assert adapt.batchnorm_distance(teacher, domain) < adapt.AUTO_DISTANCE < adapt.batchnorm_distance(teacher, other)
    adapted, info = adapt.adapt_images(teacher, other, steps=60, batch_size=150)
    assert adapted.shape == other.shape and info.images == 300 and info.steps == 60
    assert adapted.min() >= other.min() and adapted.max() <= other.max()  # within the images' own range
    assert info.distance_after < info.distance_before / 2
    assert info.distance_after == pytest.approx(adapt.batchnorm_distance(teacher, adapted, batch_size=150), rel=1e-4)
    again, _ = adapt.adapt_images(teacher, other, steps=60, batch_size=150)
    np.testing.assert_array_equal(adapted, again)  # deterministic: a resumed run adapts alike


def test_auto_adapts_only_images_from_another_domain(tmp_path):
    teacher, domain = bn_teacher()
    ds = tf.data.Dataset.from_tensor_slices(domain).batch(40)
    same, held, info = adapt.adapt_dataset(teacher, ds, None, mode="auto")
    assert info is None and same is ds and held is None
    other = sparse_images(200, seed=2)
    heldout = other[:20]
    ds = tf.data.Dataset.from_tensor_slices((other[20:], np.zeros(180, "int32"))).batch(40)  # labels are dropped
    cache = tmp_path / "adapted.npz"
    out, held, info = adapt.adapt_dataset(teacher, ds, heldout, mode="auto", steps=20, cache=cache)
    images = np.concatenate(list(out.as_numpy_iterator()))
    assert images.shape == (360, 10, 10, 1) and next(iter(out)).shape[0] == 40
    assert info["images"] == 200 and info["distance_after"] < info["distance_before"]
    assert held.shape == (40, 10, 10, 1)
    np.testing.assert_array_equal(held[:20], heldout)  # the held-out originals and their own copies
    trained = {x.tobytes() for x in images}
    assert not any(x.tobytes() in trained for x in held)  # no held-out image, nor its copy, trains
    # a second run reads the cache back instead of adapting again
    out2, held2, info2 = adapt.adapt_dataset(teacher, ds, heldout, mode="auto", steps=20, cache=cache)
    np.testing.assert_array_equal(np.concatenate(list(out2.as_numpy_iterator())), images)
    np.testing.assert_array_equal(held2, held)
    assert "distance_after" not in info2
    # the same images in another order (a reshuffled data set) are read back, each copy beside its own image
    swapped = np.concatenate([heldout[10:], heldout[:10]])
    reshuffled = tf.data.Dataset.from_tensor_slices(other[20:][::-1].copy()).batch(40)
    out3, held3, info3 = adapt.adapt_dataset(teacher, reshuffled, swapped, mode="auto", steps=20, cache=cache)
    assert "distance_after" not in info3
    np.testing.assert_array_equal(held3[20:], np.concatenate([held[30:], held[20:30]]))
    images3 = np.concatenate(list(out3.as_numpy_iterator()))
    assert sorted(x.tobytes() for x in images3) == sorted(x.tobytes() for x in images)
    # one image changed: the set is another, adapted again (a copy of the old image must not stand for it)
    changed = heldout.copy()
    changed[0, 0, 0, 0] += 1.0
    info4 = adapt.adapt_dataset(teacher, ds, changed, mode="auto", steps=20, cache=cache)[2]
    assert "distance_after" in info4
    # "none" never adapts; a teacher without BatchNormalization cannot be adapted to
    assert adapt.adapt_dataset(teacher, ds, None, mode="none")[2] is None
    plain = keras.Sequential([keras.Input((10, 10, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert adapt.adapt_dataset(plain, ds, None, mode="auto")[2] is None
    with pytest.raises(tfsubspace.UnsupportedModelError, match="no BatchNormalization"):
        adapt.adapt_dataset(plain, ds, None, mode="always")
    with pytest.raises(ValueError, match="adapt must be one of"):
        adapt.adapt_dataset(teacher, ds, None, mode="sometimes")


def test_auto_leaves_images_whose_adaptation_is_too_much_work(monkeypatch, capsys):
    teacher, _ = bn_teacher()
    ds = tf.data.Dataset.from_tensor_slices(sparse_images(300, seed=2)).batch(50)
    probe = batchnorm_inputs(teacher)[1]
    per_image_step = stats.count_macs(probe) + adapt.OUTPUT_MACS * stats.count_outputs(probe)
    work = adapt.adaptation_work(teacher, 300, 5)
    assert stats.count_macs(probe) > 0 and work == 300 * 5 * per_image_step
    # the limit is counted, not timed: just over the work adapts, just under leaves the images
    monkeypatch.setattr(adapt, "AUTO_MAX_WORK", work)
    assert adapt.adapt_dataset(teacher, ds, None, mode="auto", steps=5)[2]["images"] == 300
    monkeypatch.setattr(adapt, "AUTO_MAX_WORK", work - 1)
    out, held, info = adapt.adapt_dataset(teacher, ds, None, mode="auto", steps=5, log=print)
    assert info is None and out is ds
    assert f"is {work:.2g} MAC-equivalents" in capsys.readouterr().out
    assert adapt.adapt_dataset(teacher, ds, None, mode="always", steps=5)[2] is not None  # "always" still adapts


def test_compress_adds_adapted_images_from_another_domain(tmp_path):
    teacher, _ = bn_teacher()
    other = sparse_images(160, seed=3)
    result = tfsubspace.compress(
        teacher, other, work_dir=tmp_path / "run", width_ratio=0.5, epochs=1, recover_epochs=1, adapt_steps=10
    )
    report = result.report
    assert report["adaptation"]["images"] == 160 and report["adaptation"]["steps"] == 10
    held = report["heldout_images"]
    assert held > 0 and held % 2 == 0  # the held-out images and their adapted copies
    assert (tmp_path / "run" / "adapted_images.npz").exists()
    off = tfsubspace.compress(teacher, other, width_ratio=0.5, epochs=1, recover_epochs=0, adapt="none", verbose=0)
    assert off.report["adaptation"] is None
    with pytest.raises(ValueError, match="adapt must be one of"):
        tfsubspace.compress(teacher, other, adapt="yes")
