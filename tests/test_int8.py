"""Full int8 that keeps the model: exact float rewrites (folding, equalization), bias correction,
the per-tensor diagnosis, and the automatic export that tries them when plain int8 fails."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfsubspace.edge import autoint8, biascorrect, convert, diagnose, edgetpu, equalize, export, fold, graphedit, split

L = keras.layers


def _randomize_batchnorm(model, rng, spread):
    """BatchNormalization statistics as a trained model has them: scales over `spread` decades."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            gamma = rng.choice([-1, 1], c, p=[0.2, 0.8]) * 10 ** rng.uniform(-spread / 2, spread / 2, c)
            layer.set_weights(
                [gamma, rng.normal(0, 1, c), rng.normal(0, 0.5, c), 10 ** rng.uniform(-2, 1, c)]
                if layer.center and layer.scale
                else layer.get_weights()
            )


def random_model(draw_ops, seed):
    """A small CNN of randomly chosen blocks, each of an order found in real models."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((10, 10, 2))
    x = inputs
    for op, padding, filters in draw_ops:
        if op == "conv_relu_bn":  # the Keras-tutorial order
            x = L.BatchNormalization()(L.Conv2D(filters, 3, padding=padding, activation="relu")(x))
        elif op == "conv_bn_relu":
            x = L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 3, padding=padding, use_bias=False)(x)))
        elif op == "conv_bn_relu6":
            x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(filters, 1, padding=padding)(x)))
        elif op == "conv_relu_layer_bn_pool":
            x = L.MaxPooling2D(padding="same")(
                L.BatchNormalization()(L.ReLU()(L.Conv2D(filters, 3, padding=padding)(x)))
            )
        elif op == "depthwise_relu_bn":
            x = L.BatchNormalization()(L.DepthwiseConv2D(3, padding=padding, activation="relu")(x))
        elif op == "bn_conv":
            x = L.Conv2D(filters, 3, padding=padding, activation="relu")(L.BatchNormalization()(x))
        elif op == "separable_bn_relu":  # the Xception order
            x = L.ReLU()(L.BatchNormalization()(L.SeparableConv2D(filters, 3, padding=padding, use_bias=False)(x)))
        elif op == "separable_relu_bn":
            x = L.BatchNormalization()(L.SeparableConv2D(filters, 3, padding=padding, activation="relu")(x))
    x = L.Flatten()(x)
    x = L.BatchNormalization()(L.Dense(6, activation="relu")(x))
    model = keras.Model(inputs, L.Dense(4)(x))
    _randomize_batchnorm(model, rng, spread=3)
    return model


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "conv_relu_bn",
                "conv_bn_relu",
                "conv_bn_relu6",
                "conv_relu_layer_bn_pool",
                "depthwise_relu_bn",
                "bn_conv",
                "separable_bn_relu",
                "separable_relu_bn",
            ]
        ),
        st.sampled_from(["same", "valid"]),
        st.integers(2, 5),
    ),
    min_size=1,
    max_size=3,
).filter(lambda ops: sum(p == "valid" for _, p, _ in ops) + sum(o.endswith("pool") for o, _, _ in ops) <= 2)


def _relative_diff(a, b, x):
    ref = graphedit.predict(a, x)
    return np.max(np.abs(graphedit.predict(b, x) - ref)) / max(np.max(np.abs(ref)), 1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 1000))
def test_folding_and_equalization_keep_the_function(ops, seed):
    model = random_model(ops, seed)
    x = np.random.default_rng(seed).normal(0, 1, (16, 10, 10, 2)).astype("float32")
    folded, report = fold.fold_batchnorm(model)
    assert len(report) == sum(isinstance(layer, L.BatchNormalization) for layer in model.layers)
    assert _relative_diff(model, folded, x) < 1e-4, report
    equalized, report = equalize.equalize(folded, x)
    assert _relative_diff(model, equalized, x) < 1e-4, report


def test_relu_then_batchnorm_folds_away_with_exact_borders():
    model = random_model([("conv_relu_bn", "same", 4), ("conv_relu_bn", "same", 3)], seed=3)
    folded, report = fold.fold_batchnorm(model)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers), report
    conv1, bn1, conv2 = model.layers[1:4]
    assert report[0] == f"{bn1.name}: scale into {conv1.name} (through ReLU), shift into {conv2.name}"
    # the shift met zero padding in the original: a border map keeps the borders exact
    assert any(isinstance(layer, graphedit.BiasMap) for layer in folded.layers)
    x = np.random.default_rng(0).normal(0, 1, (8, 10, 10, 2)).astype("float32")
    assert _relative_diff(model, folded, x) < 1e-5
    # and the rebuilt model saves and loads like any Keras model
    assert folded.get_config()


def test_relu6_and_merges_are_left_alone():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    a = L.ReLU(6.0)(L.Conv2D(3, 1)(inputs))
    b = L.BatchNormalization()(a)  # after ReLU6: its scale cannot go back through the clip
    out = L.Conv2D(2, 1)(L.Add()([b, inputs]))  # and its output is merged: nowhere to go forward
    model = keras.Model(inputs, out)
    _randomize_batchnorm(model, np.random.default_rng(0), spread=2)
    folded, report = fold.fold_batchnorm(model)
    assert "kept" in report[0] and "ReLU6" in report[0]
    equalized, report = equalize.equalize(folded, np.ones((2, 6, 6, 3), "float32"))
    assert any("ReLU6" in line for line in report)


def starved_model(seed=2):
    """Conv -> ReLU -> BatchNormalization where the convolution makes one channel 300 times
    wider than the others and the BN brings them all back to one range: the ReLU output's single
    int8 scale, set by the wide channel, leaves the others a step or two."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.BatchNormalization()(x)
    x = L.Flatten()(L.MaxPooling2D()(x))
    model = keras.Model(inputs, L.Dense(5)(x), name="starved")
    conv, bn = model.layers[1], model.layers[2]
    gain = np.full(8, 10**-2.5)
    gain[0] = 1.0
    conv.set_weights([rng.normal(0, 0.5, (3, 3, 1, 8)) * gain, np.zeros(8)])
    bn.set_weights([np.ones(8), rng.normal(0, 0.1, 8), np.zeros(8), gain**2])
    return model


def images(n, seed):
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 1)).astype("float32")


def test_automatic_int8_fixes_a_failing_model(tmp_path):
    model = starved_model()
    calibration, check = images(200, 0), images(300, 1)
    steps = autoint8.int8_steps(model, calibration, check, min_agreement=0.97, stop_at_pass=False)
    names = [s.name for s in steps]
    assert names == ["plain", "fold", "equalize", "bias", "output"]
    plain, folded = steps[0], steps[1]
    assert plain.agreement < 0.9 and not plain.passed
    assert plain.disagreements == round((1 - plain.agreement) * len(check))
    assert 0 <= plain.near_ties <= plain.disagreements
    assert folded.passed and folded.agreement > plain.agreement and folded.float_max_abs_diff < 1e-3
    assert folded.rewrite_seconds > 0 and "scale into" in folded.notes[0]
    # export() keeps the first file that passes, and says where plain int8 lost
    result = export.export(
        model, tmp_path, modes=("int8",), calibration_ds=calibration, check_ds=check, min_agreement=0.97
    )[0]
    assert result.passed and [s["step"] for s in result.steps] == ["plain", "fold"]
    assert result.agreement == pytest.approx(result.steps[1]["agreement"])
    assert "plain int8 agreed" in result.message
    assert any("channels under 4 steps" in line or "rounded by over 10%" in line for line in result.diagnosis)
    assert edgetpu.edgetpu_check(result.path)["compatible"]
    # the plain-only export keeps failing: the fixes are what passes it
    plain_only = export.export(
        model,
        tmp_path,
        modes=("int8",),
        calibration_ds=calibration,
        check_ds=check,
        min_agreement=0.97,
        int8_fixes=(),
        diagnose_failures=False,
    )[0]
    assert not plain_only.passed and len(plain_only.steps) == 1 and not plain_only.diagnosis


def test_near_ties_of_an_unsure_model_are_named():
    expected = np.array([[1.0, 0.9, 0.0], [5.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    got = np.array([[0.85, 1.0, 0.0], [5.0, 0.1, 0.0], [0.0, 0.0, 3.0]])
    margin, error = autoint8.tie_margins(expected, got)
    np.testing.assert_allclose(margin, [0.1, 5.0, 1.0])
    np.testing.assert_allclose(error, [0.15, 0.1, 2.0])
    step = autoint8.Int8Step("plain", b"", 1 / 3, 2.0, False, disagreements=2, near_ties=2, median_margin=1.0)
    assert "2 of its 2 disagreements are near ties" in export._near_ties(step)
    # a file whose disagreements are mostly rounding of confident images says nothing of ties
    assert export._near_ties(dataclasses.replace(step, near_ties=0)) == ""


def test_a_single_output_unit_has_no_near_ties():
    inputs = keras.Input((8, 8, 1))
    x = L.Flatten()(L.Conv2D(4, 3, activation="relu")(inputs))
    model = keras.Model(inputs, L.Dense(1, activation="sigmoid")(x))
    (plain,) = autoint8.int8_steps(model, images(50, 0), images(20, 1), fixes=())
    assert plain.agreement == 1.0 and plain.near_ties == 0 and plain.median_margin is None


def test_diagnosis_names_the_starved_tensor():
    model = starved_model()
    plain = autoint8.int8_steps(model, images(200, 0), images(50, 1), fixes=())[0]
    d = diagnose.diagnose(plain.content, model, images(50, 1))
    conv = d.tensors[0]
    assert conv.op == "CONV_2D" and conv.starved_channels >= 3 and conv.channels == 8
    assert d.tensors[-1].relative_error > 0.1
    text = diagnose.format_diagnosis(d)
    assert "Findings:" in text and "starved" in text
    assert d.to_json()["tensors"][0]["channels"] == 8


def test_bias_correction_changes_only_biases():
    model, _ = fold.fold_batchnorm(starved_model())
    plain = autoint8.int8_steps(model, images(100, 0), images(20, 1), fixes=())[0]
    corrected, report = biascorrect.correct_biases(model, plain.content, images(100, 0))
    assert len(report) == 2 and all("mean int8 shift" in line for line in report)
    for old, new in zip(model.layers, corrected.layers):
        if graphedit.is_linear_layer(old):
            np.testing.assert_allclose(new.get_weights()[0], old.get_weights()[0], rtol=1e-6)


def test_unknown_fix_and_rewrite_of_shared_layers():
    with pytest.raises(ValueError, match="Unknown int8 fixes"):
        autoint8.int8_steps(starved_model(), images(2, 0), images(2, 0), fixes=("magic",))
    shared_bn = L.BatchNormalization()
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, L.Add()([shared_bn(inputs), shared_bn(L.Conv2D(2, 1)(inputs))]))
    folded, report = fold.fold_batchnorm(model)
    assert report == [f"{shared_bn.name}: kept (called more than once)"]
    x = images(4, 0).repeat(2, axis=-1)[:, :4, :4]
    assert _relative_diff(model, folded, x) < 1e-6


def test_export_accepts_datasets_of_batches_and_keeps_the_folded_file_over_a_passing_plain_one(tmp_path):
    ds = tf.data.Dataset.from_tensor_slices(images(64, 0)).batch(16)
    result = export.export(starved_model(), tmp_path, modes=("int8",), calibration_ds=ds, min_agreement=0.0)[0]
    plain, folded = result.steps
    assert result.passed and plain["passed"] and (plain["step"], folded["step"]) == ("plain", "fold")
    # the folded file is the one written: its BatchNormalization is gone, so it is smaller
    assert result.size_bytes == folded["size_bytes"] == result.path.stat().st_size < plain["size_bytes"]
    # without folding among the fixes, a passing plain file is the end
    (unfolded,) = export.export(
        starved_model(), tmp_path, modes=("int8",), calibration_ds=ds, min_agreement=0.0, int8_fixes=("equalize",)
    )
    assert unfolded.passed and [s["step"] for s in unfolded.steps] == ["plain"]
    assert unfolded.size_bytes == plain["size_bytes"]


def test_the_kept_int8_step():
    def step(name, agreement, passed):
        return autoint8.Int8Step(name, b"", agreement, 0.0, passed)

    plain, fold_ok = step("plain", 0.995, True), step("fold", 0.993, True)
    assert autoint8.best([plain]) is plain
    assert autoint8.best([plain, fold_ok]) is fold_ok  # an exact fold that passes beats a passing plain file
    failing = [step("plain", 0.95, False), step("fold", 0.97, False), step("equalize", 0.97, False)]
    assert autoint8.best(failing) is failing[1]  # none passed: the highest agreement, the earliest of equals
    assert autoint8.best([*failing, step("bias", 0.991, True)]).name == "bias"


def separable_model(seed=0):
    """Xception blocks: SeparableConv2D -> BN -> Add with a 1x1 Conv2D + BN shortcut,
    then SeparableConv2D -> ReLU -> BN, whose shift goes into the next SeparableConv2D."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    a = L.BatchNormalization()(L.SeparableConv2D(4, 3, padding="same", use_bias=False, depth_multiplier=2)(inputs))
    shortcut = L.BatchNormalization()(L.Conv2D(4, 1, use_bias=False)(inputs))
    x = L.Add()([a, shortcut])
    x = L.BatchNormalization()(L.ReLU()(L.SeparableConv2D(5, 3, padding="same")(x)))
    x = L.SeparableConv2D(3, 3, padding="same", activation="relu")(x)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)), name="separable")
    _randomize_batchnorm(model, np.random.default_rng(seed), spread=3)
    return model


def test_separable_batchnorm_folds_exactly():
    model = separable_model()
    x = np.random.default_rng(0).normal(0, 1, (16, 8, 8, 3)).astype("float32")
    folded, report = fold.fold_batchnorm(model)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers), report
    assert _relative_diff(model, folded, x) < 1e-5, report
    sep1, sep2, sep3 = [layer.name for layer in model.layers if isinstance(layer, L.SeparableConv2D)]
    assert any(line.endswith(f"folded into {sep1} (linear -> BN)") for line in report), report
    assert any(f"scale into {sep2} (through ReLU), shift into {sep3}" in line for line in report), report
    # the shift met zero padding in the original: the next separable convolution gets a border map
    assert any(isinstance(layer, graphedit.BiasMap) for layer in folded.layers)
    # equalization of the ReLU chain and of each depthwise/pointwise pair keeps the function too
    equalized, report = equalize.equalize(folded, x)
    assert _relative_diff(model, equalized, x) < 1e-5, report
    assert sum("depthwise output range spread" in line for line in report) == 3, report
    layer = equalized.get_layer(sep1)
    assert not np.allclose(layer.get_weights()[0], folded.get_layer(sep1).get_weights()[0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strides=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    multiplier=st.integers(1, 3),
    padding=st.sampled_from(["same", "valid"]),
    activation=st.sampled_from([None, "relu", "relu6"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_a_separable_convolution_splits_exactly(strides, dilation, multiplier, padding, activation, use_bias, seed):
    if strides > 1 and dilation > 1:  # Keras refuses both at once
        dilation = 1
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((9, 9, 3))
    x = L.SeparableConv2D(
        4,
        3,
        strides=strides,
        dilation_rate=dilation,
        depth_multiplier=multiplier,
        padding=padding,
        activation=activation,
        use_bias=use_bias,
        bias_initializer="random_normal",
    )(inputs)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    x = np.random.default_rng(seed).normal(0, 1, (8, 9, 9, 3)).astype("float32")
    parts, report = split.split_separable(model)
    assert not any(isinstance(layer, L.SeparableConv2D) for layer in parts.layers), report
    assert [type(layer).__name__ for layer in parts.layers[1:3]] == ["DepthwiseConv2D", "Conv2D"]
    assert parts.count_params() == model.count_params()
    assert _relative_diff(model, parts, x) < 1e-5, report


def test_separable_blocks_with_residual_adds_split_exactly():
    model = separable_model()
    parts, report = split.split_separable(model)
    assert len(report) == 3 and all("split into" in line for line in report), report
    x = np.random.default_rng(0).normal(0, 1, (16, 8, 8, 3)).astype("float32")
    assert _relative_diff(model, parts, x) < 1e-5, report


def test_bias_correction_finds_separable_convolutions():
    model, _ = fold.fold_batchnorm(separable_model())
    calibration = np.random.default_rng(1).normal(0, 1, (32, 8, 8, 3)).astype("float32")
    plain = autoint8.int8_steps(model, calibration, calibration[:8], fixes=())[0]
    corrected, report = biascorrect.correct_biases(model, plain.content, calibration)
    names = [layer.name for layer in model.layers if isinstance(layer, L.SeparableConv2D)]
    assert all(any(line.startswith(f"{name}: mean int8 shift") for line in report) for name in names), report
    for name in names:  # only the bias moves
        old, new = model.get_layer(name).get_weights(), corrected.get_layer(name).get_weights()
        np.testing.assert_allclose(new[0], old[0], rtol=1e-6)
        np.testing.assert_allclose(new[1], old[1], rtol=1e-6)


def test_diagnosis_names_rounding_spread_over_many_tensors():
    def tensor(i, rel, added):
        return diagnose.TensorError(
            i, f"t{i}", "CONV_2D", [1, 4], 0.1, 0, (-1.0, 1.0), (-0.8, 0.8), 0.0, rel, added, 0.0, 0, 4
        )

    spread = diagnose.Diagnosis([tensor(i, 0.02 * (i + 1), 0.02) for i in range(4)], [], 10)
    (line,) = spread.findings()
    assert "rounding spread over 4 int8 tensors" in line and "8.0%" in line
    assert diagnose.Diagnosis([tensor(0, 0.01, 0.01)], [], 10).findings() == []


def test_benchmark_spread_of_channel_ranges_keeps_the_function():
    # benchmarks/int8.py's relu_bn_spread: relu_bn with its ReLU channels rescaled, BN compensating
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from int8 import relu_into_batchnorm, spread_channel_ranges

    model = random_model([("conv_relu_bn", "same", 5), ("conv_bn_relu", "same", 4), ("conv_relu_bn", "valid", 3)], 7)
    spread = spread_channel_ranges(model, keras, name="spread")
    pairs = relu_into_batchnorm(model, keras)
    assert [layer.name for layer, _ in pairs] == [model.layers[i].name for i in (1, 6, 9)]
    x = np.random.default_rng(0).normal(0, 1, (16, 10, 10, 2)).astype("float32")
    assert _relative_diff(model, spread, x) < 1e-5
    factors = []  # each rescaled channel's factor, from its kernel
    for layer, _ in pairs:
        before, after = (np.abs(m.get_layer(layer.name).get_weights()[0]) for m in (model, spread))
        factors.append(after.reshape(-1, after.shape[-1]).sum(0) / before.reshape(-1, before.shape[-1]).sum(0))
    s = np.concatenate(factors)
    assert np.all((s >= 0.04 * 0.999) & (s <= 31.5 * 1.001)) and s.max() / s.min() > 100, s
    # the Conv -> BN -> ReLU block is not rescaled
    for a, b in zip(model.layers[3].get_weights(), spread.layers[3].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_benchmark_records_flags_as_absl_reads_them_back():
    # a results file's command must rerun what made it: a boolean off is --noNAME, not --NAME=False
    import sys

    from absl import flags as absl_flags
    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from int8 import command_flag

    values = absl_flags.FlagValues()
    absl_flags.DEFINE_boolean("patient_students", True, "", flag_values=values)
    absl_flags.DEFINE_integer("calibration_examples", 500, "", flag_values=values)
    values(["int8.py", command_flag("patient_students", False), command_flag("calibration_examples", 300)])
    assert values.patient_students is False and values.calibration_examples == 300
    values(["int8.py", command_flag("patient_students", True)])
    assert values.patient_students is True


def residual_model(pool: bool, seed=0):
    """x -> conv -> (ReLU -> small 1x1 conv [-> max-pooling]) + the conv's output: the branch's values
    span a seventh of the sum's, and only the residual ADD reads the branch's last tensor."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4), batch_size=1)
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(8, 1, name="b", kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))(
        keras.layers.ReLU()(a)
    )
    if pool:
        a = keras.layers.MaxPooling2D(2, name="pool_a")(a)
        b = keras.layers.MaxPooling2D(2, name="pool_b")(b)
    x = keras.layers.Add(name="add")([a, b])
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def test_int8_inputs_of_in_place_adds_get_their_own_ranges():
    # TFLite's calibrator logs an op's inputs again after it ran; an ADD that wrote into its
    # input's buffer gave that input the range of the sum (tensorflow/tensorflow#127842)
    from tfsubspace.edge import shared_ranges
    from tfsubspace.edge.runtime import TFLiteRunner

    model = residual_model(pool=False)
    calibration = images(100, seed=0)[..., :1].repeat(4, -1)
    plain = convert.convert(model, "int8", calibration=calibration, repair_ranges=False)
    float32 = convert.convert(model, "float32")
    repaired, repairs = shared_ranges.repair_shared_ranges(plain, float32, calibration)
    assert repaired == convert.convert(model, "int8", calibration=calibration)  # convert() repairs by default
    assert [r.op for r in repairs] == ["ADD"] and "/b_" in repairs[0].tensor
    # every int8 activation now has the parameters of its own float range, as the converter computes them
    details = TFLiteRunner(repaired).interpreter.get_tensor_details()
    activations = {  # per-tensor int8 (a per-channel kernel's scale reads 0 here)
        d["name"]: d["quantization"] for d in details if d["dtype"] == np.int8 and d["quantization"][0] > 0
    }
    own = shared_ranges._float_ranges(float32, set(activations), calibration, 1)
    assert len(own) >= 4
    for name, (low, high) in own.items():
        expected = shared_ranges.int8_parameters(low, high)
        assert activations[name] == (pytest.approx(expected[0], rel=1e-5), expected[1]), name
    # and the branch's int8 values are several times closer to its float values
    check = images(200, seed=1)[..., :1].repeat(4, -1)
    errors = [
        next(
            t.relative_error
            for t in diagnose.diagnose(c, model, check, float_tflite=float32).tensors
            if t.name == repairs[0].tensor
        )
        for c in (plain, repaired)
    ]
    assert errors[1] < errors[0] / 3, errors
    # a file without in-place ops is returned as it is, and no float file is converted for it
    chain = keras.Sequential([keras.Input((8, 8, 4), batch_size=1), keras.layers.Conv2D(4, 3), keras.layers.Flatten()])
    content = convert.convert(chain, "int8", calibration=calibration, repair_ranges=False)
    untouched = shared_ranges.repair_shared_ranges(content, lambda: pytest.fail("converted a float file"), calibration)
    assert untouched == (content, [])


def test_a_range_repair_keeps_a_max_pooling_tied_to_its_input():
    # MAX_POOL_2D needs its input's scale on its output (XNNPACK refuses the file otherwise): a
    # pooled branch before the ADD is repaired with the convolution that feeds the pooling
    from tensorflow.lite.tools import flatbuffer_utils

    from tfsubspace.edge import shared_ranges

    calibration = images(100, seed=0)[..., :1].repeat(4, -1)
    content = convert.convert(residual_model(pool=True), "int8", calibration=calibration, repair_ranges=False)
    g = shared_ranges._Graph(flatbuffer_utils.read_model_from_bytearray(bytearray(content)))
    groups = {g.graph.tensors[i].name.decode(): g.group(i) for i in g.candidates()}
    pooled = next(group for name, group in groups.items() if "pool_b" in name)
    assert [g.op_name[g.writer[i]] for i in pooled] == ["MAX_POOL_2D", "CONV_2D"]


def test_logits_are_clipped_where_the_top_classes_fall(tmp_path):
    # wide logits give the int8 output coarse steps, while the top two classes of an unsure image sit
    # within a few units of each other: clipped to where they fall, the file's steps are finer and top-1 stays
    from tfsubspace import fileio, load_model
    from tfsubspace.edge import output_range
    from tfsubspace.edge.runtime import TFLiteRunner

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), batch_size=1)
    x = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="wide")
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([kernel * 40, bias])
    calibration, check = images(200, 0), images(300, 1)
    narrowed, notes = output_range.narrow_output(model, calibration)
    assert "clipped to" in notes[0] and narrowed.count_params() == model.count_params()
    for x in (calibration, check):
        before, after = graphedit.predict(model, x), graphedit.predict(narrowed, x)
        assert np.abs(after).max() < np.abs(before).max()  # cut where no top class falls
        np.testing.assert_array_equal(after.argmax(-1), before.argmax(-1))
        probabilities = [keras.ops.convert_to_numpy(keras.ops.softmax(v)) for v in (before, after)]
        assert np.abs(probabilities[1] - probabilities[0]).max() <= 9 * np.exp(-output_range.MARGIN) * 1.01
    # the file: MINIMUM and MAXIMUM after the last layer, whose int8 steps are finer
    files = [convert.convert(m, "int8", calibration=calibration) for m in (model, narrowed)]
    steps = [TFLiteRunner(f).output["quantization"][0] for f in files]
    assert steps[1] < steps[0] / 1.5, steps
    assert {"MINIMUM", "MAXIMUM"} <= set(runtime_ops(files[1])) and edgetpu.edgetpu_check(files[1])["compatible"]
    # a saved narrowed model loads back; probabilities (a softmax) are left alone
    again = load_model(fileio.save_model(narrowed, tmp_path / "narrowed.keras"))
    np.testing.assert_allclose(graphedit.predict(again, check), graphedit.predict(narrowed, check), rtol=1e-6)
    softmax = keras.Model(inputs, keras.layers.Softmax()(model.outputs[0]))
    assert output_range.narrow_output(softmax, calibration)[0] is softmax


def runtime_ops(content: bytes) -> list:
    from tfsubspace.edge.runtime import inspect

    return inspect(content)["ops"]
