"""Channel analysis and surgery: property tests over random models, reference models, errors."""

import json

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tfsubspace
from tfsubspace import keras_private, models
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.prune import analysis, channels, surgery
from tfsubspace.prune.plan import PlanError, PruningPlan
from tfsubspace.prune.surgery import VerificationError

L = keras.layers


def randomize(model, rng):
    """Random weights everywhere, BN statistics included, so that no layer is an identity;
    kernels are scaled by their fan-in so that activations stay of order one."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize(layer, rng)
            continue
        values = []
        for w in layer.weights:
            name = w.path.rsplit("/", 1)[-1]
            v = rng.normal(0.0, 0.3, size=w.shape)
            if "kernel" in name:
                v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(w.shape[:-1])), size=w.shape)
            elif name == "gamma":
                v += 1.0
            elif name == "moving_variance":
                v = rng.uniform(0.5, 1.5, size=w.shape)
            values.append(v.astype("float32"))
        if values:
            layer.set_weights(values)
    return model


def random_model(seed: int) -> keras.Model:
    """A random model mixing every supported construct, small enough to run in a blink."""
    rng = np.random.default_rng(seed)
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]
    ch = lambda: int(rng.integers(2, 9))
    size = int(pick(8, 12))
    inputs = L.Input((size, size, 3))
    x = L.Conv2D(ch(), 3, padding="same")(inputs)
    c = x.shape[-1]
    for _ in range(int(rng.integers(2, 6))):
        kind = pick("conv", "post_res", "pre_res", "concat", "depthwise", "separable", "pool")
        if kind == "conv":
            x = L.Conv2D(
                ch(),
                pick(1, 3),
                padding=pick("same", "valid") if x.shape[1] > 4 else "same",
                use_bias=bool(rng.integers(2)),
            )(x)
            if rng.integers(2):
                x = L.BatchNormalization()(x)
            x = L.ReLU()(x)
        elif kind == "post_res":  # ResNet style: conv-BN-ReLU-conv-BN + identity, then ReLU
            y = L.ReLU()(L.BatchNormalization()(L.Conv2D(ch(), 3, padding="same", use_bias=False)(x)))
            y = L.BatchNormalization()(L.Conv2D(c, 3, padding="same", use_bias=False)(y))
            x = L.ReLU()(L.Add()([x, y]))
        elif kind == "pre_res":  # WRN style: BN-ReLU, two convs, projection shortcut on width change
            out = pick(c, ch())
            pre = L.ReLU()(L.BatchNormalization()(x))
            y = L.Conv2D(ch(), 3, padding="same")(pre)
            y = L.Conv2D(out, 3, padding="same")(L.ReLU()(L.BatchNormalization()(y)))
            shortcut = x if out == c else L.Conv2D(out, 1)(pre)
            x = L.Add()([shortcut, y])
        elif kind == "concat":
            a = L.Conv2D(ch(), 1)(x)
            b = L.ReLU()(L.Conv2D(ch(), 3, padding="same")(x))
            x = L.Concatenate()([a, b] if rng.integers(2) else [a, b, x])
        elif kind == "depthwise":
            x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=int(pick(1, 2)))(x)
            x = L.ReLU()(L.BatchNormalization()(x))
        elif kind == "separable":
            x = L.SeparableConv2D(ch(), 3, padding="same", depth_multiplier=int(pick(1, 2)))(x)
        elif kind == "pool" and x.shape[1] >= 4:
            x = pick(L.MaxPooling2D, L.AveragePooling2D)(2)(x)
        c = x.shape[-1]
    if rng.integers(2):
        x = L.Dense(ch(), activation="relu")(L.GlobalAveragePooling2D()(x))
    else:
        x = L.BatchNormalization()(L.Dense(ch())(L.Flatten()(x)))
    return randomize(keras.Model(inputs, L.Dense(3)(x)), rng)


def random_plan(a: analysis.ChannelAnalysis, seed: int) -> PruningPlan:
    rng = np.random.default_rng(seed + 1)
    masks = {}
    for g in a.groups.values():
        if g.prunable:
            mask = rng.random(g.size) < 0.5
            mask[rng.integers(g.size)] = True
            masks[g.name] = mask
    # Every layer keeps at least one output channel (a merged group may span several layers).
    for node in a.graph.walk():
        ids = a.ids[node.outputs[0].key]
        if not a.kept_positions(node.outputs[0], a.keep_vector(masks)).size:
            name, index = a.channel_position(int(ids[0]))
            masks[name][index] = True
    return PruningPlan.from_masks(a, masks)


def check_surgery(model, plan, a, tmp_path, x=None):
    result = surgery.apply_plan(model, plan, analysis=a, check_batch=x)
    slim = result.model
    assert result.max_abs_diff <= 1e-4
    assert slim.count_params() == surgery.plan_params(a, plan)
    removed = sum(g["size"] - len(g["keep"]) for g in plan.groups.values())
    if removed:
        assert slim.count_params() < model.count_params()
    path = tmp_path / "slim.keras"
    slim.save(path)
    loaded = keras.models.load_model(path)
    probe = np.random.default_rng(7).normal(size=(2, *model.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(loaded(probe), slim(probe), atol=1e-6)
    return result


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
@example(seed=6407)  # a Concatenate + Add group whose plan once emptied one branch
def test_random_models_slim_equals_masked(seed, tmp_path):
    model = random_model(seed)
    a = analysis.analyze(model)
    check_surgery(model, random_plan(a, seed), a, tmp_path)


def random_modern_model(seed: int) -> keras.Model:
    """A random model of the constructs of recent architectures: keras.ops activations and
    residual adds, per-channel constants, grouped convolutions, GroupNormalization,
    squeeze-and-excite with ops, a broadcast spatial attention."""
    rng = np.random.default_rng(seed)
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(2 * int(rng.integers(1, 5)), 3, padding="same")(inputs)
    for _ in range(int(rng.integers(2, 6))):
        c = x.shape[-1]
        divisors = [d for d in range(1, c + 1) if c % d == 0]
        kind = pick("ops_act", "grouped", "groupnorm", "se", "attention", "residual", "widen")
        if kind == "ops_act":  # hard swish with ops, then a per-channel scale
            x = x * keras.ops.relu6(x + 3.0) * (1.0 / 6.0) * rng.uniform(0.5, 1.5, c).astype("float32")
        elif kind == "grouped":
            groups = int(pick(*divisors))
            x = L.Conv2D(groups * int(rng.integers(1, 3)), 3, padding="same", groups=groups)(x)
            x = L.ReLU()(L.BatchNormalization()(x))
        elif kind == "groupnorm":
            x = L.GroupNormalization(int(pick(*divisors)))(x)
        elif kind == "se":
            se = keras.ops.mean(x, axis=(1, 2), keepdims=True)
            se = L.Conv2D(int(rng.integers(1, 4)), 1, activation="relu")(se)
            x = x * keras.ops.sigmoid(L.Conv2D(c, 1)(se))
        elif kind == "attention":
            x = L.Multiply()([x, L.Conv2D(1, 3, padding="same", activation="sigmoid")(x)])
        elif kind == "residual":
            x = x + L.Conv2D(c, 3, padding="same")(keras.ops.relu(x))
        else:
            x = L.Conv2D(2 * int(rng.integers(1, 5)), 1)(x)
    if rng.integers(2):
        x = L.GlobalAveragePooling2D()(x)
    else:
        x = keras.ops.reshape(x, (-1, 64 * x.shape[-1]))
    return randomize(keras.Model(inputs, L.Dense(3)(x)), rng)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_modern_models_slim_equals_masked(seed, tmp_path):
    model = random_modern_model(seed)
    a = analysis.analyze(model)
    check_surgery(model, random_plan(a, seed), a, tmp_path)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_random_modern_model(seed, tmp_path):
    model = random_modern_model(seed)
    a = analysis.analyze(model)
    check_surgery(model, random_plan(a, seed), a, tmp_path)


def test_masking_is_not_trivially_satisfied():
    """The masked reference really differs from the unmasked model, so the check has teeth."""
    model = random_model(3)
    a = analysis.analyze(model)
    plan = random_plan(a, 3)
    x = np.random.default_rng(0).normal(size=(4, *model.input_shape[1:])).astype("float32")
    masked = surgery.masked_predict(model, plan, x, a)[0]
    assert np.max(np.abs(masked - keras.ops.convert_to_numpy(model(x)))) > 1e-3


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.vgg16((32, 32, 3), 10, width=0.125),
        lambda: models.wide_resnet((16, 16, 3), 10, depth=16, widen_factor=2),
        lambda: models.lenet5((28, 28, 1), 10),
    ],
)
def test_reference_models(build, tmp_path):
    model = randomize(build(), np.random.default_rng(0))
    a = analysis.analyze(model)
    assert not a.groups["logits"].prunable
    result = check_surgery(model, random_plan(a, 0), a, tmp_path)
    total = result.report
    assert sum(r["params_after"] for r in total) == result.model.count_params()


def test_wrn_groups_merge_along_residual_adds():
    a = analysis.analyze(models.wide_resnet((16, 16, 3), 10, depth=16, widen_factor=2))
    stage1 = a.groups["g1b1_shortcut"]
    assert stage1.producers == ["g1b1_shortcut", "g1b1_conv2", "g1b2_conv2"] and stage1.size == 32
    assert a.groups["g1b2_conv1"].producers == ["g1b2_conv1"]


def test_nested_and_sequential_models(tmp_path):
    rng = np.random.default_rng(1)
    block_in = L.Input((8, 8, 4))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(block_in)))
    block = keras.Model(block_in, L.Conv2D(4, 1)(y), name="block")
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.Add()([x, block(x)])
    x = block(x)  # the nested model is called twice: shared weights, one set of channels
    outputs = L.Dense(2)(L.GlobalAveragePooling2D()(x))
    model = randomize(keras.Model(inputs, outputs), rng)
    a = analysis.analyze(model)
    names = list(a.groups)
    inner = [n for n in names if n.startswith("block/")]
    assert len(inner) == 1 and a.groups[inner[0]].size == 6  # one group for both calls
    outer = a.groups[names[0]]  # the first conv, the Add and the block's last conv: one group
    assert outer.size == 4 and len(outer.producers) == 2 and outer.producers[1].startswith("block/")
    check_surgery(model, random_plan(a, 1), a, tmp_path)

    seq = randomize(
        keras.Sequential([L.Input((10,)), L.Dense(8, activation="relu"), L.Dropout(0.1), L.Dense(6), L.Dense(2)]), rng
    )
    a = analysis.analyze(seq)
    check_surgery(seq, random_plan(a, 2), a, tmp_path)


def test_other_layer_types(tmp_path):
    rng = np.random.default_rng(2)
    inputs = L.Input((10, 3))
    x = L.Conv1D(6, 3, padding="same", activation="relu")(inputs)
    x = L.Reshape((10, 1, 6))(x)
    x = L.Conv2DTranspose(5, (3, 1), strides=(2, 1), padding="same")(x)
    x = L.SeparableConv2D(4, (3, 1), depth_multiplier=2, padding="same")(x)
    x = L.Reshape((-1,))(x)
    model = randomize(keras.Model(inputs, L.Dense(2)(L.Dense(5)(x))), rng)
    a = analysis.analyze(model)
    check_surgery(model, random_plan(a, 3), a, tmp_path)


def test_constant_channels_fold_into_consumer_bias():
    rng = np.random.default_rng(4)
    inputs = L.Input((9, 9, 2))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(6, 3, use_bias=False, name="c1")(inputs)))
    x = L.Conv2D(5, 3, use_bias=False, name="c2")(x)  # 'valid': the fold is exact
    x = L.Dense(3, name="out")(L.GlobalAveragePooling2D()(L.ReLU()(x)))
    model = randomize(keras.Model(inputs, x), rng)
    kernel = model.get_layer("c1").kernel.numpy()
    kernel[..., [1, 4]] = 0.0  # as LASSO leaves them: filter zero, BN beta not
    model.get_layer("c1").kernel.assign(kernel)
    gamma, beta, mean, var = model.get_layer("bn").get_weights()
    beta[[1, 4]] = 2.0
    model.get_layer("bn").set_weights([gamma, beta, mean, var])
    a = analysis.analyze(model)
    plan = PruningPlan.from_masks(a, {"c1": np.array([1, 0, 1, 1, 0, 1], bool)})
    x = rng.normal(size=(4, 9, 9, 2)).astype("float32")
    result = surgery.apply_plan(model, plan, check_batch=x, fold_constants=True)
    assert result.folds == [
        {"layer": "c2", "positions": 2, "folded": True, "exact": True, "max_abs_diff": pytest.approx(0.0, abs=1e-5)}
    ]
    np.testing.assert_allclose(result.model(x), model(x), atol=1e-4)
    assert result.model.get_layer("c2").use_bias
    # Without folding, the slim model matches the masked model but not the original.
    plain = surgery.apply_plan(model, plan, check_batch=x)
    assert np.max(np.abs(keras.ops.convert_to_numpy(plain.model(x) - model(x)))) > 1e-2


def test_a_channel_dead_in_the_original_is_no_constant_once_others_are_masked():
    inputs = L.Input((1,))
    h1 = L.Dense(2, name="h1")(inputs)  # h1 = (x, 3 + 0.01 x)
    h2 = L.Dense(2, activation="relu", name="h2")(h1)  # h2_0 = relu(x - h1_1): dead, unless h1_1 is masked
    model = keras.Model(inputs, L.Dense(1, name="out")(h2))
    model.get_layer("h1").set_weights([np.array([[1.0, 0.01]], "float32"), np.array([0.0, 3.0], "float32")])
    model.get_layer("h2").set_weights([np.array([[1.0, 1.0], [-1.0, 0.0]], "float32"), np.zeros(2, "float32")])
    model.get_layer("out").set_weights([np.ones((2, 1), "float32"), np.zeros(1, "float32")])
    a = analysis.analyze(model)
    plan = PruningPlan.from_masks(a, {"h1": [0], "h2": [1]})
    x = np.linspace(0.0, 1.0, 8, dtype="float32")[:, None]
    assert np.all(keras.ops.convert_to_numpy(model.get_layer("h2")(model.get_layer("h1")(x)))[:, 0] == 0)
    result = surgery.apply_plan(model, plan, check_batch=x, fold_constants=True)
    assert result.max_abs_diff <= 1e-6 and result.folds == []


def constant_channel_model(padding: str = "same") -> keras.Model:
    """c1 -> bn -> relu -> c2 (inexact fold if 'same') -> relu -> c3 -> pooled Dense; c1's
    channel 0 has a zero filter and a BN beta of 2, so it carries a constant into c2."""
    rng = np.random.default_rng(5)
    inputs = L.Input((6, 6, 2))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(3, 3, padding="same", use_bias=False, name="c1")(inputs)))
    x = L.ReLU()(L.Conv2D(4, 3, padding=padding, name="c2")(x))
    x = L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(3, 1, name="c3")(x)))
    model = randomize(keras.Model(inputs, x), rng)
    kernel = model.get_layer("c1").kernel.numpy()
    kernel[..., 0] = 0.0
    model.get_layer("c1").kernel.assign(kernel)
    gamma, beta, mean, var = model.get_layer("bn").get_weights()
    beta[0] = 2.0
    model.get_layer("bn").set_weights([gamma, beta, mean, var])
    return model


def test_inexact_fold_is_reported_and_the_rest_still_verified():
    model = constant_channel_model()
    a = analysis.analyze(model)
    plan = PruningPlan.from_masks(a, {"c1": [1, 2], "c2": [0, 1, 3]})
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    result = surgery.apply_plan(model, plan, check_batch=x, fold_constants=True)
    [fold] = result.folds
    assert {k: fold[k] for k in ("layer", "positions", "folded", "exact")} == {
        "layer": "c2",
        "positions": 1,
        "folded": True,
        "exact": False,
    }
    assert fold["max_abs_diff"] > 1e-2  # the borders of c2's output
    assert result.check_diff <= 1e-5  # the slim model is exactly the folded masked model
    assert result.max_abs_diff > 1e-3  # ... which is not the original with its constant


def test_an_inexact_fold_does_not_hide_a_wrong_layer(monkeypatch):
    model = constant_channel_model()
    a = analysis.analyze(model)
    plan = PruningPlan.from_masks(a, {"c1": [1, 2], "c2": [0, 1, 3]})
    slice_weights = channels.Producer.slice_weights

    def wrong_for_c3(self, layer, keep_in, keep_out):
        values = slice_weights(self, layer, keep_in, keep_out)
        if layer.name == "c3":
            values[0] = values[0][..., ::-1, :]  # kept input channels in the wrong order
        return values

    monkeypatch.setattr(channels.Producer, "slice_weights", wrong_for_c3)
    with pytest.raises(VerificationError, match="differs from the masked model"):
        surgery.apply_plan(model, plan, fold_constants=True)


def test_a_wrong_exact_fold_names_its_layer(monkeypatch):
    model = constant_channel_model("valid")
    a = analysis.analyze(model)
    plan = PruningPlan.from_masks(a, {"c1": [1, 2]})
    fold = channels.Producer.fold_constants
    monkeypatch.setattr(
        channels.Producer,
        "fold_constants",
        lambda self, layer, c, keep_in: (fold(self, layer, c, keep_in)[0] * 0.5, True),
    )
    with pytest.raises(VerificationError, match="'c2'.*exact"):
        surgery.apply_plan(model, plan, fold_constants=True)


def test_plan_round_up_save_load(tmp_path):
    a = analysis.analyze(models.vgg16((32, 32, 3), 10, width=0.25))
    plan = PruningPlan.from_masks(a, {"conv1": [0, 1, 2], "conv3": np.arange(32) < 9})
    rounded = plan.round_up(8, scores={"conv1": np.arange(16)[::-1]})
    assert len(rounded.groups["conv1"]["keep"]) == 8
    assert rounded.groups["conv1"]["keep"] == list(range(8))  # highest scores are the low indices
    assert len(rounded.groups["conv3"]["keep"]) == 16
    assert len(rounded.groups["logits"]["keep"]) == 10  # capped at the group size
    path = rounded.save(tmp_path / "plan.json")
    assert PruningPlan.load(path) == rounded
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="Cannot read pruning plan .*bad.json"):
        PruningPlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"groups": {}}))
    with pytest.raises(PlanError, match="Not a tfsubspace pruning plan.*other.json"):
        PruningPlan.load(tmp_path / "other.json")


@pytest.mark.parametrize(
    "keep, problem",
    [
        ([0, 120], "out of range"),
        ([-1, 3], "out of range"),
        ([3, 1], "increasing"),
        ([1, 1], "increasing"),
        ([True, False], "integers"),
        ([1.0], "integers"),
        ([[1], 2], "integers"),
    ],
)
def test_plan_file_with_bad_indices_names_the_file(tmp_path, keep, problem):
    model = models.lenet5()
    a = analysis.analyze(model)
    obj = PruningPlan.keep_all(a).to_json()
    obj["groups"]["fc1"]["keep"] = keep
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(PlanError, match=f"plan.json.*'fc1'.*{problem}"):
        PruningPlan.load(path)
    # The same plan made in memory is refused by every entry point, never with an IndexError.
    plan = PruningPlan(a.model.name, a.fingerprint(), obj["groups"])
    for call in (plan.masks, lambda: plan.round_up(8), lambda: surgery.apply_plan(model, plan, verify=False)):
        with pytest.raises(PlanError, match=f"'fc1'.*{problem}"):
            call()


def test_plan_file_for_another_model_names_the_file(tmp_path):
    model = models.lenet5()
    other = analysis.analyze(models.vgg16((32, 32, 3), 10, width=0.125))
    path = PruningPlan.keep_all(other).save(tmp_path / "vgg_plan.json")
    plan = PruningPlan.load(path)
    with pytest.raises(PlanError, match="vgg_plan.json.*made for model 'vgg16_w0.125'"):
        surgery.apply_plan(model, plan)
    obj = json.loads(path.read_text())
    del obj["fingerprint"]
    path.write_text(json.dumps(obj))
    with pytest.raises(PlanError, match="vgg_plan.json.*fingerprint"):
        PruningPlan.load(path)


# ---------------------------------------------------------------- errors


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


class Custom(L.Layer):
    def call(self, x):
        return x * 2.0


def test_subclassed_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="subclassed model"):
        analysis.analyze(Subclassed())


def test_unsupported_and_lambda_layers_are_named():
    inputs = L.Input((4,))
    model = keras.Model(inputs, L.Dense(2)(Custom(name="doubler")(L.Dense(3)(inputs))))
    with pytest.raises(UnsupportedModelError, match="'doubler' \\(Custom\\): no channel handler"):
        analysis.analyze(model)
    # a handler for one call: the analysis and the surgery built on it use it, the registry is untouched
    a = analysis.analyze(model, handlers={Custom: channels.PassThrough()})
    assert [g.size for g in a.groups.values()] == [3, 2]
    plan = PruningPlan.from_masks(a, {g: np.arange(g_.size) < g_.size - 1 for g, g_ in a.groups.items() if g_.prunable})
    slim = surgery.apply_plan(model, plan, analysis=a, check_batch=np.ones((2, 4), "float32"))
    assert slim.max_abs_diff >= 0 and slim.model.count_params() < model.count_params()
    with pytest.raises(UnsupportedModelError, match="no channel handler"):
        analysis.analyze(model)
    with pytest.raises(TypeError, match="handler for Custom must be a tfsubspace.prune.channels.Handler"):
        analysis.analyze(model, handlers={Custom: "pass"})
    lam = keras.Model(inputs, L.Lambda(lambda t: t[..., :2], name="slicer")(L.Dense(3)(inputs)))
    with pytest.raises(UnsupportedModelError, match="'slicer' \\(Lambda\\): a Lambda layer"):
        analysis.analyze(lam)


def test_softmax_pins_its_group():
    inputs = L.Input((4,))
    x = L.Softmax(name="sm")(L.Dense(5, name="d")(inputs))
    a = analysis.analyze(keras.Model(inputs, L.Dense(2)(x)))
    assert a.groups["d"].pinned == ["Softmax 'sm' mixes channels"]
    with pytest.raises(PlanError, match="cannot be pruned: pinned by Softmax 'sm'"):
        PruningPlan.from_masks(a, {"d": [0, 1]}).validate(a)


def test_plan_that_empties_one_branch_of_a_merged_group():
    inputs = L.Input((4, 4, 2))
    x = L.Concatenate()([L.Conv2D(2, 1, name="a")(inputs), L.Conv2D(3, 1, name="b")(inputs)])
    x = L.Add()([x, L.Conv2D(5, 1, name="c")(inputs)])
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    a = analysis.analyze(model)
    assert a.groups["a"].producers == ["a", "b", "c"] and a.groups["a"].size == 5
    with pytest.raises(PlanError, match="removes every output channel of layer 'b'"):
        PruningPlan.from_masks(a, {"a": [0, 1]}).validate(a)


def test_plan_errors():
    model = models.lenet5()
    a = analysis.analyze(model)
    with pytest.raises(PlanError, match="'conv2' would lose all 16 channels"):
        surgery.apply_plan(model, PruningPlan.from_masks(a, {"conv2": np.zeros(16, bool)}))
    other = analysis.analyze(models.vgg16((32, 32, 3), 10, width=0.125))
    with pytest.raises(PlanError, match="made for model 'vgg16_w0.125'"):
        surgery.apply_plan(model, PruningPlan.keep_all(other))
    with pytest.raises(PlanError, match="No channel group 'conv9'"):
        PruningPlan.from_masks(a, {"conv9": [0]})
    with pytest.raises(PlanError, match="'conv2': a keep-mask of shape \\(5,\\) for a group of 16"):
        PruningPlan.from_masks(a, {"conv2": np.ones(5, bool)})
    bad = PruningPlan.keep_all(a)
    bad.groups["fc1"]["keep"] = [0, 0, 500]
    with pytest.raises(PlanError, match="'fc1': kept indices must be distinct integers in \\[0, 120\\)"):
        bad.validate(a)
    with pytest.raises(PlanError, match="'logits' cannot be pruned: pinned by model output"):
        PruningPlan.from_masks(a, {"logits": [0, 1]}).validate(a)


@pytest.mark.parametrize("shared_axes", [[1, 2, 3], [3], [1, 2], None])
def test_prelu_with_any_shared_axes_is_sliced_and_counted(shared_axes, tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.PReLU(shared_axes=shared_axes, alpha_initializer=keras.initializers.Constant(0.2), name="act")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="c2")(x))))
    a = analysis.analyze(model)
    check_surgery(model, random_plan(a, 1), a, tmp_path)  # slim == masked, plan_params == the slim count


def test_rescaling_and_normalization_first_layers(tmp_path):
    inputs = L.Input((8, 8, 3))
    norm = L.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(2.0, 3.0, size=(16, 8, 8, 3)).astype("float32"))
    x = norm(L.Rescaling(1 / 255.0, name="scale")(inputs))
    x = L.Conv2D(6, 3, padding="same", name="c1")(x)
    x = L.Rescaling(0.5, name="halve")(x)  # a scalar scale is channel-wise: c1 stays prunable
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="c2")(x))))
    a = analysis.analyze(model)
    assert a.groups["c1"].prunable
    check_surgery(model, random_plan(a, 2), a, tmp_path)
    per_channel = L.Rescaling([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], name="per_channel")
    pinned = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(per_channel(L.Conv2D(6, 3, name="c")(inputs)))))
    group = analysis.analyze(pinned).groups["c"]
    assert not group.prunable and "per-channel scale" in " ".join(group.pinned)


# ---------------------------------------------------------------- keras.ops nodes, grouped convolution, norms


def test_keras_ops_nodes_map_like_their_layers(tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = keras.ops.relu6(x * np.linspace(0.5, 1.5, 6).astype("float32") + 3.0) * (1.0 / 6.0)  # a per-channel constant
    y = L.Conv2D(6, 1, name="c2")(inputs)
    x = keras.ops.add(x, y) - np.full((1, 1, 6), 0.1, "float32")  # ties c1 and c2
    x = keras.ops.divide(x, keras.ops.exp(y))  # removed channels are 0 / 1 = 0 in the masked model
    se = keras.ops.mean(x, axis=(1, 2), keepdims=True)  # squeeze-and-excite, with ops
    se = keras.ops.sigmoid(L.Conv2D(6, 1, name="se_expand")(L.Conv2D(3, 1, name="se_reduce")(se)))
    x = keras.ops.transpose(x * se, (0, 2, 1, 3))  # the channel axis stays last
    z = L.Conv2D(4, 1, name="c3")(inputs)
    x = keras.ops.concatenate([x, z], axis=-1)
    x = keras.ops.reshape(x, (-1, 8 * 8 * 10))
    model = randomize(keras.Model(inputs, L.Dense(2, name="out")(x)), np.random.default_rng(3))
    a = analysis.analyze(model)
    assert a.groups["c1"].producers == ["c1", "c2", "se_expand"] and a.groups["c1"].prunable
    assert a.groups["c3"].prunable and a.groups["se_reduce"].prunable
    plan = PruningPlan.from_masks(a, {"c1": [0, 2, 5], "c3": [1, 3], "se_reduce": [0, 2]})
    result = check_surgery(model, plan, a, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    masked = surgery.masked_predict(model, plan, x, a)[0]
    assert np.max(np.abs(masked - keras.ops.convert_to_numpy(model(x)))) > 1e-3  # the plan matters
    np.testing.assert_allclose(keras.ops.convert_to_numpy(result.model(x)), masked, atol=1e-5)
    # the per-channel constants were cut to the kept channels (the scalars kept whole)
    constants = [
        node.arguments.args[1]
        for op in result.model.operations
        if type(op).__name__ in ("Multiply", "Subtract")
        for node in op._inbound_nodes
        if not isinstance(node.arguments.args[1], keras.KerasTensor)
    ]
    assert sorted(np.size(c) for c in constants) == [1, 3, 3]


def test_keras_ops_that_reduce_or_move_channels():
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    total = keras.ops.sum(x, axis=-1, keepdims=True)  # zeros add nothing: c1 stays prunable
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(L.Conv2D(2, 1)(x) * total)))
    a = analysis.analyze(model)
    [made] = [g for g in a.groups.values() if g.name.startswith("sum")]  # the sum's own channel, pinned
    assert a.groups["c1"].prunable
    assert made.pinned == [f"Sum {made.name!r} makes its channels out of the ones it reduces"]
    mean = keras.ops.mean(x, axis=-1, keepdims=True)  # a mean of fewer channels is another mean
    a = analysis.analyze(keras.Model(inputs, L.Dense(2)(L.Flatten()(x * mean))))
    assert a.groups["c1"].pinned == [f"Mean {mean._keras_history.operation.name!r} reduces over the channels"]
    moved = keras.Model(inputs, L.Dense(2)(L.Flatten()(keras.ops.transpose(x, (0, 3, 1, 2)))))
    named = r"keras.ops operation 'transpose\w*' \(ops.numpy.Transpose, not a layer\): moves the channel axis"
    with pytest.raises(UnsupportedModelError, match=named):
        analysis.analyze(moved)
    split = keras.Model(inputs, L.Dense(2)(L.Flatten()(keras.ops.reshape(x, (-1, 8, 8, 3, 2)))))
    with pytest.raises(UnsupportedModelError, match="'reshape\\w*'.*moves the channel axis"):
        analysis.analyze(split)


def test_an_unregistered_op_is_named_as_an_op_and_can_be_registered(tmp_path, monkeypatch):
    inputs = L.Input((4,))
    model = randomize(
        keras.Model(inputs, L.Dense(2, name="out")(keras.ops.arctan(L.Dense(5, name="d")(inputs)))),
        np.random.default_rng(0),
    )
    with pytest.raises(
        UnsupportedModelError,
        match=r"keras.ops operation 'arctan\w*' \(ops.numpy.Arctan, not a layer\): no channel handler is registered "
        r"for this operation; register one with tfsubspace.register_layer_handler\(keras.ops",
    ):
        analysis.analyze(model)
    a = analysis.analyze(model, handlers={keras.ops.arctan: channels.Elementwise()})  # the function names its op
    check_surgery(model, PruningPlan.from_masks(a, {"d": [0, 3]}), a, tmp_path)
    monkeypatch.setattr(channels, "_REGISTRY", dict(channels._REGISTRY))  # the global registry, restored after
    tfsubspace.register_layer_handler(keras.ops.arctan, channels.Elementwise())
    assert analysis.analyze(model).groups["d"].prunable
    assert channels.op_class(keras.ops.arctan) is type(model.get_layer("out").input._keras_history.operation)
    with pytest.raises(TypeError, match="layer_class must be a keras Layer class, a keras.ops Operation class"):
        channels.register("arctan", channels.Elementwise())
    with pytest.raises(TypeError, match="Cannot tell which operation"):
        channels.register(lambda: None, channels.Elementwise())


def test_broadcast_over_channels_cbam_style(tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", name="c1")(inputs)))
    attention = L.Conv2D(1, 7, padding="same", activation="sigmoid", name="spatial")(x)  # (H, W, 1)
    x = L.Multiply()([x, attention])  # broadcast over the channels: c1 stays prunable
    x = keras.ops.maximum(x, attention * 0.5)
    model = randomize(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), np.random.default_rng(4))
    a = analysis.analyze(model)
    assert a.groups["c1"].prunable and a.groups["c1"].size == 6 and a.groups["spatial"].size == 1
    check_surgery(model, PruningPlan.from_masks(a, {"c1": [1, 2, 4]}), a, tmp_path)
    # CBAM's own attention map pools over the channels: a mean of fewer channels differs, so they are pinned
    pooled = keras.ops.concatenate(
        [keras.ops.mean(x, axis=-1, keepdims=True), keras.ops.max(x, axis=-1, keepdims=True)], axis=-1
    )
    cbam = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x * L.Conv2D(1, 7, padding="same")(pooled))))
    assert not analysis.analyze(cbam).groups["c1"].prunable


@pytest.mark.parametrize("groups, filters", [(6, 6), (6, 12), (2, 4), (3, 9)])
def test_grouped_convolution_prunes_whole_groups(groups, filters, tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", name="c1")(inputs)))
    x = L.Conv2D(filters, 3, padding="same", groups=groups, name="grouped")(x)
    x = L.BatchNormalization()(x)
    model = randomize(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), np.random.default_rng(5))
    a = analysis.analyze(model)
    assert a.groups["c1"].size == groups  # one channel per group of the grouped convolution
    assert a.groups["c1"].producers == ["c1"]  # the grouped convolution makes no group of its own
    keep = [0, groups - 1] if groups > 2 else [1]
    result = check_surgery(model, PruningPlan.from_masks(a, {"c1": keep}), a, tmp_path)
    slim = result.model.get_layer("grouped")
    assert slim.groups == len(keep) and slim.filters == len(keep) * filters // groups


def test_grouped_convolution_by_position(tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.ReLU()(L.Conv2D(6, 3, padding="same", name="c1")(inputs))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(x))
    model = randomize(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), np.random.default_rng(6))
    conv = channels.Convolution(grouped=channels.GroupedConvByPosition())
    a = analysis.analyze(model, handlers={L.Conv2D: conv})
    assert a.groups["c1"].size == 3 and a.groups["grouped"].size == 4  # positions within a group
    plan = PruningPlan.from_masks(a, {"c1": [0, 2], "grouped": [1, 2, 3]})
    result = check_surgery(model, plan, a, tmp_path)
    slim = result.model.get_layer("grouped")
    assert slim.groups == 2 and slim.filters == 6 and slim.kernel.shape[-2] == 2


def test_grouped_convolution_by_position_folds_constants():
    inputs = L.Input((7, 7, 2))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(4, 3, use_bias=False, name="c1")(inputs)))
    x = L.Conv2D(6, 1, groups=2, name="grouped")(x)  # 1x1: the fold is exact
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(L.ReLU()(x))))
    model = randomize(model, np.random.default_rng(7))
    kernel = model.get_layer("c1").kernel.numpy()
    kernel[..., [1, 3]] = 0.0  # position 1 of both groups: zero filters, BN beta 2
    model.get_layer("c1").kernel.assign(kernel)
    gamma, beta, mean, var = model.get_layer("bn").get_weights()
    beta[[1, 3]] = 2.0
    model.get_layer("bn").set_weights([gamma, beta, mean, var])
    a = analysis.analyze(model, handlers={L.Conv2D: channels.Convolution(grouped=channels.GroupedConvByPosition())})
    plan = PruningPlan.from_masks(a, {"c1": [0]})
    x = np.random.default_rng(1).normal(size=(4, 7, 7, 2)).astype("float32")
    result = surgery.apply_plan(model, plan, analysis=a, check_batch=x, fold_constants=True)
    assert [(f["layer"], f["exact"]) for f in result.folds] == [("grouped", True)]
    np.testing.assert_allclose(result.model(x), model(x), atol=1e-4)


def test_group_normalization_keeps_whole_groups(tmp_path):
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.GroupNormalization(groups=4, name="gn")(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(L.ReLU()(x))
    x = L.GroupNormalization(groups=-1, name="instance")(x)  # one channel per group
    x = L.Conv2D(4, 1, name="c3")(x)
    x = L.GroupNormalization(groups=1, name="all")(x)  # every channel in one group
    model = randomize(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), np.random.default_rng(8))
    a = analysis.analyze(model)
    assert a.groups["c1"].size == 4 and a.groups["c2"].size == 6
    assert a.groups["c3"].pinned == ["GroupNormalization 'all' normalizes over all channels together (groups=1)"]
    result = check_surgery(model, PruningPlan.from_masks(a, {"c1": [1, 3], "c2": [0, 4, 5]}), a, tmp_path)
    assert result.model.get_layer("gn").groups == 2 and result.model.get_layer("instance").groups == 3


def test_layer_norm_pins_and_layer_scale_follows(tmp_path):
    layer_scale = keras_private.application_layer("convnext", "LayerScale")
    inputs = L.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.Conv2D(6, 7, padding="same", groups=6, name="depthwise")(x)  # ConvNeXt's block, in short
    x = L.LayerNormalization(name="ln")(x)
    y = L.Dense(12, activation="gelu", name="expand")(x)
    y = layer_scale(0.5, 6, name="scale")(L.Dense(6, name="project")(y))
    x = x + y  # a keras.ops Add, as in ConvNeXt
    model = randomize(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))), np.random.default_rng(9))
    a = analysis.analyze(model)
    assert a.groups["c1"].pinned == ["LayerNormalization 'ln' mixes channels"]
    assert a.groups["expand"].prunable
    check_surgery(model, PruningPlan.from_masks(a, {"expand": [0, 5, 7]}), a, tmp_path)
    # a LayerScale on prunable channels is cut with them
    inputs = L.Input((4,))
    h = layer_scale(0.5, 5, name="scale")(L.Dense(5, name="d")(inputs))
    model = randomize(keras.Model(inputs, L.Dense(2)(h)), np.random.default_rng(10))
    a = analysis.analyze(model)
    result = check_surgery(model, PruningPlan.from_masks(a, {"d": [1, 2]}), a, tmp_path)
    assert result.model.get_layer("scale").projection_dim == 2


@keras.saving.register_keras_serializable(package="tfsubspace_tests")
class Scale(L.Layer):
    """A custom layer with one weight per channel, made from the input's last axis."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_the_documented_custom_handlers(tmp_path, monkeypatch):
    """docs/pipeline.md's example: a custom per-channel layer and a keras.ops function."""
    monkeypatch.setattr(channels, "_REGISTRY", dict(channels._REGISTRY))
    tfsubspace.register_layer_handler(Scale, channels.Follower())
    tfsubspace.register_layer_handler(keras.ops.arctan, channels.Elementwise())
    inputs = L.Input((6, 6, 3))
    x = keras.ops.arctan(Scale(name="scale")(L.Conv2D(5, 3, name="c1")(inputs)))
    model = randomize(keras.Model(inputs, L.Dense(2)(L.Flatten()(x))), np.random.default_rng(11))
    a = tfsubspace.analyze(model)
    result = check_surgery(model, PruningPlan.from_masks(a, {"c1": [0, 3]}), a, tmp_path)
    assert result.model.get_layer("scale").scale.shape == (2,)


def test_axis_moves_that_keep_the_channels_last(tmp_path):
    inputs = L.Input((6, 6, 3))
    x = L.Conv2D(5, 3, padding="same", name="c1")(inputs)
    se = keras.ops.expand_dims(keras.ops.expand_dims(L.GlobalAveragePooling2D()(x), 1), 1)  # (B, 1, 1, C)
    x = L.Permute((2, 1, 3))(x * keras.ops.sigmoid(se))
    x = keras.ops.softmax(x, axis=1)  # over a spatial axis: channel-wise
    x = keras.ops.squeeze(keras.ops.max(x, axis=1, keepdims=True), axis=1)  # (B, 6, C)
    model = randomize(keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(x))), np.random.default_rng(12))
    a = analysis.analyze(model)
    assert a.groups["c1"].prunable
    check_surgery(model, PruningPlan.from_masks(a, {"c1": [1, 4]}), a, tmp_path)
    mixed = keras.Model(inputs, L.Dense(2)(L.Flatten()(keras.ops.softmax(L.Conv2D(5, 1, name="c")(inputs)))))
    assert analysis.analyze(mixed).groups["c"].pinned[0].startswith("Softmax ")


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")  # deprecated, but a LayerNormalization may have it
@pytest.mark.parametrize("rms_scaling", [False, True])
def test_layer_norm_pruned_by_opt_in_reports_its_deviation(rms_scaling, tmp_path):
    inputs = L.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = L.LayerNormalization(rms_scaling=rms_scaling, name="ln")(x)
    y = L.Dense(16, activation="gelu", name="expand")(x)
    x = x + L.Dense(8, name="project")(y)
    model = randomize(
        keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x))), np.random.default_rng(13)
    )
    assert not analysis.analyze(model).groups["stem"].prunable  # pinned by default
    a = analysis.analyze(model, handlers={L.LayerNormalization: channels.PrunableLayerNorm()})
    assert a.groups["stem"].prunable and a.groups["stem"].producers == ["stem", "project"]
    plan = PruningPlan.from_masks(a, {"stem": [0, 2, 3, 6], "expand": np.arange(16) % 3 > 0})
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 3)).astype("float32")
    result = surgery.apply_plan(model, plan, analysis=a, check_batch=x)
    # every other layer is exact: the slim model is the masked original with the slim LayerNormalization
    assert result.check_diff <= 1e-5
    [approximation] = result.approximations
    assert approximation["layer"] == "ln" and approximation["max_abs_diff"] > 1e-2  # statistics of 4 channels, not 8
    assert result.max_abs_diff > 1e-3  # ... which the masked original is not
    assert result.model.count_params() == surgery.plan_params(a, plan) < model.count_params()
    result.model.save(tmp_path / "slim.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "slim.keras")(x), result.model(x), atol=1e-6)
