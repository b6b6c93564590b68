import keras
import numpy as np
import pytest

from tfsubspace import models
from tfsubspace.distill import regularizers
from tfsubspace.distill.lasso import ChannelLasso
from tfsubspace.prune import analysis


def test_group_lasso_by_hand():
    x = np.array([[3.0, 0.0], [-4.0, 1.0]], dtype="float32")  # columns are the groups
    assert float(regularizers.GroupLasso(2.0, epsilon=0.0)(x)) == pytest.approx(2.0 * (5.0 + 1.0))
    kernel = np.zeros((3, 3, 2, 4), "float32")
    kernel[..., 1] = 1.0  # one filter of 18 ones: norm sqrt(18)
    assert float(regularizers.GroupLasso(1.0, epsilon=0.0)(kernel)) == pytest.approx(np.sqrt(18.0))


def test_regularizers_validate_and_survive_keras_save_load(tmp_path):
    with pytest.raises(ValueError, match="factor must be a non-negative float. Received: factor=-1"):
        regularizers.GroupLasso(-1)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, kernel_regularizer=regularizers.GroupLasso(0.25))(inputs)
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    dense = loaded.layers[-1]
    assert isinstance(dense.kernel_regularizer, regularizers.GroupLasso)
    assert dense.kernel_regularizer.get_config() == {"factor": 0.25, "epsilon": 1e-12}


def test_soft_threshold_zeroes_exactly_the_small_groups():
    x = np.array([[0.1, 3.0, 0.3], [0.1, 4.0, 0.4]], "float32")  # norms: 0.141, 5, 0.5
    out = keras.ops.convert_to_numpy(regularizers.soft_threshold_groups(x, 0.5))
    assert np.all(out[:, 0] == 0.0) and np.all(out[:, 2] == 0.0)
    np.testing.assert_allclose(out[:, 1], np.array([3.0, 4.0]) * (1 - 0.5 / 5.0), rtol=1e-6)


def test_channel_lasso_members_norms_and_proximal():
    model = models.vgg16((8, 8, 1), 3, width=0.125)
    a = analysis.analyze(model)
    lasso = ChannelLasso(a)
    # BN follows every conv and fc1: LASSO measures gamma and beta, never the free-scale kernels.
    assert {v.path.rsplit("/", 1)[1] for v, _ in lasso.members} == {"gamma", "beta"}
    assert lasso.num_channels == sum(g.size for g in a.groups.values() if g.prunable)
    bn = model.get_layer("bn3")
    gamma = np.tile(np.array([0.05, 0.2, 0.6, 1.0], "float32"), 4)  # bn3 has 16 channels
    bn.gamma.assign(gamma)
    # every other group has gamma = 1 everywhere: each channel counts 1 (its share of the RMS)
    expected = lasso.num_channels - 16 + gamma.sum() / np.sqrt(np.mean(gamma**2))
    assert float(lasso.penalty()) == pytest.approx(expected, rel=1e-5)
    bn.gamma.assign(gamma * 7.0)  # scale-invariant
    assert float(lasso.penalty()) == pytest.approx(expected, rel=1e-5)
    bn.gamma.assign(gamma)
    lasso.proximal(0.5)  # threshold 0.5 * mean(0.4625) = 0.23125; the strongest (1.0) is spared
    after = lasso.norms()["conv3"]
    np.testing.assert_array_equal(after == 0.0, np.tile([True, True, False, False], 4))
    shrunk = np.where(gamma == gamma.max(), gamma, np.maximum(gamma - 0.23125, 0.0))
    np.testing.assert_allclose(after, shrunk * gamma.mean() / shrunk.mean(), rtol=1e-5)
    assert after.mean() == pytest.approx(gamma.mean(), rel=1e-5)  # the group's scale is kept
    np.testing.assert_allclose(lasso.norms()["conv1"], 1.0, rtol=1e-6)  # nothing falls behind there
    assert np.all(keras.ops.convert_to_numpy(model.get_layer("conv3").kernel) != 0)  # kernels untouched


def test_channel_lasso_spans_residual_producers_without_bn():
    inputs = keras.Input((4, 4, 3))
    a_ = keras.layers.Conv2D(2, 1, name="a")(inputs)
    b_ = keras.layers.Conv2D(2, 1, use_bias=False, name="b")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Add()([a_, b_]))))
    model.get_layer("a").set_weights([np.ones((1, 1, 3, 2), "float32"), np.array([1.0, 0.0], "float32")])
    model.get_layer("b").set_weights([np.full((1, 1, 3, 2), 2.0, "float32")])
    lasso = ChannelLasso(analysis.analyze(model))
    # channel 0: a's filter (3 ones) + a's bias (1) + b's filter (3 twos): sqrt(3 + 1 + 12)
    np.testing.assert_allclose(lasso.norms()["a"], [4.0, np.sqrt(15.0)], rtol=1e-6)


def test_proximal_restores_the_scale_only_where_it_is_free():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, use_bias=False, name="d")(inputs)  # no BN after it: its scale matters
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    kernel = np.zeros((3, 4), "float32")
    kernel[0] = [0.1, 0.2, 1.0, 2.0]  # channel norms; mean 0.825
    model.get_layer("d").kernel.assign(kernel)
    lasso = ChannelLasso(analysis.analyze(model))
    lasso.proximal(0.5)  # threshold 0.4125: the first two die, 1.0 loses 0.4125, the strongest is spared
    np.testing.assert_allclose(lasso.norms()["d"], [0.0, 0.0, 1.0 - 0.4125, 2.0], rtol=1e-5)
    lasso.proximal(100.0)  # however strong the LASSO, a group keeps its strongest channel
    np.testing.assert_allclose(lasso.norms()["d"], [0.0, 0.0, 0.0, 2.0], rtol=1e-5)


def test_a_thresholded_channel_left_near_zero_is_set_to_zero():
    """A filter-measured channel that gradient steps keep near zero (under 5% of its group's
    mean norm) is snapped to zero, and only where the proximal step applies."""
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, use_bias=False, name="d")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    kernel = np.zeros((3, 4), "float32")
    kernel[0] = [0.02, 0.2, 1.0, 2.0]  # mean 0.805: 5% of it is 0.04025
    lasso = ChannelLasso(analysis.analyze(model))
    group = next(iter(lasso.group_sizes))
    model.get_layer("d").kernel.assign(kernel)
    lasso.proximal(0.0)  # no LASSO step, no snap
    np.testing.assert_allclose(lasso.norms()[group], [0.02, 0.2, 1.0, 2.0], rtol=1e-5)
    lasso.set_targets({group: np.array([False, True, True, True])})
    lasso.proximal(1e-3)  # channel 0 is not a target: it keeps its filter
    assert lasso.norms()[group][0] == pytest.approx(0.02, rel=1e-5)
    lasso.set_targets(None)
    lasso.proximal(1e-3)  # a soft threshold of about 0.0008 leaves 0.0192, under 5% of the mean
    norms = lasso.norms()[group]
    assert norms[0] == 0 and 0.198 < norms[1] < 0.2  # the others only soft-thresholded (twice)


def test_channel_lasso_targets_limit_the_proximal_step():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="c")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(x)))
    lasso = ChannelLasso(analysis.analyze(model))
    group = next(iter(lasso.group_sizes))
    model.get_layer("bn").gamma.assign(np.array([1.0, 0.2, 0.3, 2.0], "float32"))
    lasso.set_targets({group: np.array([False, True, False, False]), "out_not_prunable": np.ones(2, bool)})
    lasso.proximal(10.0)  # strong enough to zero every thresholded channel
    gamma = model.get_layer("bn").gamma.numpy()
    assert gamma[1] == 0 and np.all(gamma[[0, 2, 3]] != 0)
    lasso.set_targets(None)
    lasso.proximal(10.0)
    assert np.count_nonzero(model.get_layer("bn").gamma.numpy()) == 1  # the strongest always survives


def test_lasso_sgd_steps_are_bounded_per_layer():
    """A LASSO'd layer without a BatchNormalization (its filters are the members) moves by at
    most lasso_max_step of its norm per SGD step, whatever its gradient; small steps pass
    unchanged."""
    from tfsubspace.distill.trainer import StudentTrainer

    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(8, 1, name="squeeze")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    trainer = StudentTrainer(
        model, model, lasso=ChannelLasso(analysis.analyze(model)), lasso_weight=0.1, lasso_learning_rate=0.01
    )
    conv = model.get_layer("squeeze")
    assert {id(v) for v, _ in trainer.lasso.members} == {id(conv.kernel), id(conv.bias)}
    weight_norm = np.sqrt(sum(np.sum(keras.ops.convert_to_numpy(v) ** 2) for v in (conv.kernel, conv.bias)))
    huge = [(keras.ops.ones(v.shape) * 1e6, v) for v in (conv.kernel, conv.bias)]
    bounded = trainer._bounded(huge)
    step = 0.01 * np.sqrt(sum(np.sum(keras.ops.convert_to_numpy(g) ** 2) for g, _ in bounded))
    assert step == pytest.approx(0.02 * weight_norm, rel=1e-4)
    small = [(keras.ops.ones(v.shape) * 1e-3, v) for v in (conv.kernel, conv.bias)]
    for (g, _), (h, _) in zip(trainer._bounded(small), small):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(h))
    trainer.lasso_max_step = None
    assert trainer._bounded(huge) is huge


def test_transposed_convolution_filters_are_measured_on_their_output_axis():
    """A transposed convolution's kernel is (..., out, in): the LASSO and the L1 score measure
    (and zero) its output filters there, whatever the input and output widths."""
    from tfsubspace.prune import ranking

    inputs = keras.Input((8, 8, 4))
    x = keras.layers.ReLU()(keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, name="out")(x))
    kernel = np.random.default_rng(0).normal(size=(3, 3, 6, 4)).astype("float32")
    kernel[:, :, 2, :] *= 0.01  # output channel 2: a weak filter
    bias = np.zeros(6, "float32")
    model.get_layer("up").set_weights([kernel, bias])
    a = analysis.analyze(model)
    np.testing.assert_allclose(ranking.filter_l1_norms(a)["up"], np.abs(kernel).sum(axis=(0, 1, 3)), rtol=1e-5)
    lasso = ChannelLasso(a)
    np.testing.assert_allclose(lasso.norms()["up"], np.sqrt((kernel**2).sum(axis=(0, 1, 3))), rtol=1e-5)
    lasso.proximal(0.5)
    after = keras.ops.convert_to_numpy(model.get_layer("up").kernel)
    assert np.all(after[:, :, 2, :] == 0) and np.all(after[:, :, [0, 1, 3, 4, 5], :] != 0)
    assert lasso.norms()["up"][2] == 0.0
