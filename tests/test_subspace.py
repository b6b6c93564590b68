import keras
import numpy as np
import pytest
import tensorflow as tf

from tfsubspace.distill import subspace
from tfsubspace.errors import TfSubspaceError
from tfsubspace.prune import analysis


def stats_from(samples: np.ndarray, name="g") -> subspace.LatentStatistics:
    return subspace.LatentStatistics(name, "tap", len(samples), samples.sum(0), samples.T @ samples)


def test_spectrum_of_synthetic_latents_with_known_eigenvalues():
    rng = np.random.default_rng(0)
    eigen = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125])
    basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    z = rng.normal(size=(200_000, 8)) * np.sqrt(eigen)
    samples = z @ basis.T + 3.0  # a rotated, shifted latent: the mean must not count
    spectrum = stats_from(samples).spectrum()
    np.testing.assert_allclose(spectrum, eigen, rtol=0.03, atol=0.01)
    # 8 + 4 + 2 = 14 of 16 = 0.875; 15/16 = 0.9375
    assert subspace.energy_dimension(eigen, 0.875) == 3
    assert subspace.energy_dimension(eigen, 0.9) == 4
    assert subspace.energy_dimension(eigen, 1.0) == 8
    assert subspace.energy_dimension(np.zeros(4), 0.99) == 1


def test_choose_dimensions_bounds_and_rounding():
    eigen = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125] + [0.0] * 8)
    st = {"g": stats_from(np.random.default_rng(1).normal(size=(50, 16)))}
    st["g"].spectrum = lambda: eigen  # a known spectrum for the rule alone
    assert subspace.choose_dimensions(st, energy=0.9, multiple=1) == {"g": 4}
    assert subspace.choose_dimensions(st, energy=0.9, multiple=8) == {"g": 8}
    assert subspace.choose_dimensions(st, energy=0.9, multiple=1, min_ratio=0.5) == {"g": 8}
    assert subspace.choose_dimensions(st, energy=None, width_ratio=0.3, multiple=1) == {"g": 5}
    assert subspace.choose_dimensions(st, energy=0.999, multiple=32) == {"g": 16}  # capped at the width
    with pytest.raises(ValueError, match="exactly one of energy and width_ratio"):
        subspace.choose_dimensions(st, energy=0.9, width_ratio=0.5)
    with pytest.raises(ValueError, match="energy must be in"):
        subspace.energy_dimension(eigen, 1.5)


def test_top_channels_are_those_of_highest_variance():
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(5000, 6)) * np.array([1.0, 5.0, 0.1, 3.0, 0.2, 4.0])
    keep = subspace.top_channels({"g": stats_from(samples)}, {"g": 3})
    assert keep["g"].tolist() == [1, 3, 5]


def test_streamed_statistics_equal_the_full_batch_ones():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.ReLU(name="r")(keras.layers.Conv2D(5, 3, name="c")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    images = np.random.default_rng(0).normal(size=(40, 6, 6, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(images).batch(7)
    st = subspace.latent_statistics(model, ds, analysis.analyze(model), progress=False)["c"]
    assert st.tap == "r" and st.count == 40 * 16
    full = keras.ops.convert_to_numpy(keras.Model(inputs, x)(images)).reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(st.covariance, np.cov(full, rowvar=False, bias=True), rtol=1e-4, atol=1e-6)
    with pytest.raises(TfSubspaceError, match=r"^The data set is empty: latent statistics need at least one batch"):
        subspace.latent_statistics(model, ds.take(0), analysis.analyze(model), progress=False)


def test_statistics_and_sensitivity_are_those_of_the_augmented_views():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(5, 3, name="c")(inputs)
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(x))  # gradients depend on the image
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    images = np.random.default_rng(0).normal(size=(40, 6, 6, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(images).batch(8)
    an = analysis.analyze(model)

    class Views(keras.layers.Layer):  # a "view": the image flipped left-right, seen only in training
        def call(self, x, training=False):
            return keras.ops.flip(x, axis=2) if training else x

    views = Views()
    st = subspace.latent_statistics(model, ds, an, progress=False, augment=views)["c"]
    flipped = keras.ops.convert_to_numpy(keras.Model(inputs, x)(images[:, :, ::-1])).reshape(-1, 5)
    np.testing.assert_allclose(st.covariance, np.cov(flipped.astype(np.float64), rowvar=False, bias=True), rtol=1e-4)
    plain = subspace.latent_statistics(model, ds, an, progress=False)["c"]
    assert not np.allclose(plain.covariance, st.covariance, rtol=1e-3)
    flipped_ds = tf.data.Dataset.from_tensor_slices(images[:, :, ::-1].copy()).batch(8)
    got = subspace.output_sensitivity(model, ds, an, ["c"], augment=views)["c"]
    want = subspace.output_sensitivity(model, flipped_ds, an, ["c"])["c"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(got, subspace.output_sensitivity(model, ds, an, ["c"])["c"], rtol=1e-3)


def test_plot_is_written(tmp_path):
    st = {"a": stats_from(np.random.default_rng(3).normal(size=(100, 4)))}
    subspace.plot_spectra(st, {"a": 2}, tmp_path / "s.png", energy=0.9)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_narrowest_width_is_the_floor_of_choose_dimensions():
    from tfsubspace.distill import subspace as sub

    assert sub.narrowest(32, 0.25, 8) == 8 and sub.narrowest(32, 0.0, 8) == 8 and sub.narrowest(4, 0.0, 8) == 4
    assert sub.narrowest(40, 0.3, 8) == 16  # ceil(12 / 8) * 8
