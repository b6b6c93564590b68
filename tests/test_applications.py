"""Every keras.applications model analyses and is pruned exactly (benchmarks/applications.py's
check): one model of every family in the fast tests; every constructor with and without its top
(and a TFLite file of the build with its top) under `slow`; and compress() end to end on three."""

import contextlib
import io
import sys

import keras
import numpy as np
import pytest
from conftest import REPO

import tfsubspace
from tfsubspace import fileio
from tfsubspace.edge import convert, runtime
from tfsubspace.prune import analysis, channels, surgery
from tfsubspace.prune.plan import PruningPlan

sys.path.insert(0, str(REPO / "benchmarks"))
import applications  # noqa: E402

L = keras.layers

# The cheapest model of each family (module) of keras.applications.
FAST = {
    "convnext": "ConvNeXtTiny",
    "densenet": "DenseNet121",
    "efficientnet": "EfficientNetB0",
    "efficientnet_v2": "EfficientNetV2B0",
    "inception_resnet_v2": "InceptionResNetV2",
    "inception_v3": "InceptionV3",
    "mobilenet": "MobileNet",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet_v3": "MobileNetV3Small",
    "nasnet": "NASNetMobile",
    "resnet": "ResNet50",
    "resnet_v2": "ResNet50V2",
    "vgg16": "VGG16",
    "vgg19": "VGG19",
    "xception": "Xception",
}


def test_every_family_has_a_fast_model():
    names = applications.constructors()
    assert len(names) >= 40 and {"MobileNetV3Large", "ConvNeXtXLarge", "NASNetLarge", "EfficientNetV2L"} <= set(names)
    assert {applications.family(n) for n in names} == set(FAST)
    assert all(applications.family(name) == family for family, name in FAST.items())


# Families whose models hold what no other test model does (keras.ops nodes, grouped convolutions,
# preprocessing layers, ConvNeXt's LayerScale): their slim model also goes through a .keras file
# here (every model does in test_every_application).
WITH_FILE = {"convnext", "efficientnet", "efficientnet_v2", "mobilenet_v3"}


@pytest.mark.parametrize("name", sorted(FAST.values()))
def test_one_model_of_every_family(name, tmp_path):
    include_top = sorted(FAST.values()).index(name) % 2 == 0  # half with their top, half without
    keras_file = applications.family(name) in WITH_FILE
    row = applications.check_application(name, include_top, keras_file=keras_file, tflite=False, workdir=tmp_path)
    assert row["prunable"] > 0 and row["channels_removed"] > 0 and row["params_after"] < row["params_before"]
    assert row["max_rel_diff"] <= 1e-4 and row["plan_params"] == row["params_after"]
    assert row["slim_vs_original_rel"] > 1e-2  # the plan changes the function: the check has teeth
    assert not keras_file or row["keras_rel_diff"] <= 1e-6
    keras.backend.clear_session()


def test_what_pins_the_groups_of_models_with_ops_and_grouped_convolutions():
    a = analysis.analyze(applications.build("ConvNeXtTiny", False))
    pinned = [g for g in a.groups.values() if not g.prunable]
    # the residual streams (one per stage) through LayerNormalization; the 4x-wide MLPs are prunable
    assert len(pinned) == 4 and all(any("LayerNormalization" in r for r in g.pinned) for g in pinned)
    assert all(len(g.producers) > 1 for g in pinned)  # stem or downsampling conv, and the blocks' projections
    a = analysis.analyze(applications.build("MobileNetV3Small", True))
    assert sum(not g.prunable for g in a.groups.values()) == 1  # only the logits, pinned as the model output
    # the squeeze-and-excite's expansion multiplies the stem's channels (through the depthwise
    # convolution and the hard sigmoid made of keras.ops): one group
    assert a.groups["conv"].producers == ["conv", "expanded_conv_squeeze_excite_conv_1"] and a.groups["conv"].prunable


def test_a_model_with_ops_grouped_convolution_and_group_norm_converts_to_tflite(tmp_path):
    inputs = L.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = x * keras.ops.relu6(x + 3.0) * (1.0 / 6.0)  # hard swish, with ops
    x = L.Conv2D(8, 3, padding="same", groups=8, name="depthwise")(x)
    x = L.GroupNormalization(groups=4, name="gn")(x)
    y = L.Conv2D(16, 1, groups=2, name="grouped", activation="relu")(x)
    se = keras.ops.mean(y, axis=(1, 2), keepdims=True)
    y = y * keras.ops.hard_sigmoid(L.Conv2D(16, 1, name="se")(L.Conv2D(4, 1, name="squeeze")(se)))
    outputs = L.Dense(3, name="out")(L.GlobalAveragePooling2D()(y))
    model = keras.Model(inputs, outputs)
    x = applications.inputs_for(model)
    applications.randomize(model, x)
    a = analysis.analyze(model)
    # the stem's 8 channels go in whole GroupNorm groups (4 of 2) and whole groups of the grouped
    # convolution (2 of 4): 2 channels; the grouped convolution and the SE's expansion only follow them
    assert a.groups["stem"].size == 2 and a.groups["stem"].producers == ["stem", "se"]
    plan = applications.random_plan(a)
    result = surgery.apply_plan(model, plan, analysis=a, check_batch=x)
    slim = result.model
    assert slim.count_params() == surgery.plan_params(a, plan) < model.count_params()
    want = keras.ops.convert_to_numpy(slim(x))
    loaded = fileio.load_model(fileio.save_model(slim, tmp_path / "slim.keras"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), want, rtol=1e-6, atol=1e-6)
    with contextlib.redirect_stdout(io.StringIO()):
        content = convert.convert(convert.with_batch_size(slim), "float32")
    got = runtime.TFLiteRunner(content)(x)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.slow
@pytest.mark.applications
@pytest.mark.parametrize("include_top", [False, True], ids=["notop", "top"])
@pytest.mark.parametrize("name", applications.constructors())
def test_every_application(name, include_top, tmp_path):
    # one TFLite file per constructor: the build with its top, which holds the body of the other
    row = applications.check_application(name, include_top, tflite=include_top, workdir=tmp_path)
    assert row["max_rel_diff"] <= 1e-4 and row["keras_rel_diff"] <= 1e-6
    assert not include_top or row["tflite_rel_diff"] <= 1e-4
    keras.backend.clear_session()


def _compress(name, tmp_path, **options):
    keras.utils.set_random_seed(0)
    teacher = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    images = np.random.default_rng(0).uniform(0.0, 255.0, size=(256, 32, 32, 3)).astype("float32")
    applications.randomize(teacher, images[:32])  # BatchNormalization statistics that fit the images
    result = tfsubspace.compress(
        teacher,
        images,
        work_dir=tmp_path,
        epochs=1,
        recover_epochs=1,
        width_ratio=0.5,
        multiple=1,
        stats_batches=2,
        bn_batches=2,
        verbose=0,
        **options,
    )
    return teacher, result


# MobileNetV3Small in every run; the two larger ones (3-4 minutes each on 2 cores) with the
# applications mark, in make test-applications.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ResNet50", marks=pytest.mark.applications),
        pytest.param("EfficientNetB0", marks=pytest.mark.applications),
        "MobileNetV3Small",
    ],
)
def test_compress_end_to_end(name, tmp_path):
    teacher, result = _compress(name, tmp_path)  # with the channel LASSO (its SGD steps bounded)
    report = result.report
    assert report["student"]["params"] < 0.6 * report["teacher"]["params"]
    assert report["surgery"]["max_abs_diff"] <= 1e-4 or not all(f["exact"] for f in report["surgery"]["folds"])
    student = fileio.load_model(result.paths["student"])
    assert student.count_params() == report["student"]["params"]
    plan = PruningPlan.load(result.paths["plan"])
    assert surgery.plan_params(analysis.analyze(teacher), plan) <= report["student"]["params"]  # + folded biases


@pytest.mark.slow
def test_compress_prunes_across_layer_normalization_by_opt_in(tmp_path, monkeypatch):
    """A ConvNeXt-style residual stream through LayerNormalization: pinned by default; with the
    opt-in handler compress() prunes it, reports how far the slim normalization moved, and
    recovers by distillation."""
    L = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(32, 3, padding="same", name="stem")(inputs)
    for i in range(2):
        y = L.LayerNormalization(name=f"ln{i}")(x)
        y = L.Dense(64, activation="gelu", name=f"expand{i}")(y)
        x = x + L.Dense(32, name=f"project{i}")(y)
    x = L.GlobalAveragePooling2D()(L.LayerNormalization(name="ln_out")(x))
    teacher = keras.Model(inputs, L.Dense(4, name="logits")(x))
    images = np.random.default_rng(0).random((256, 12, 12, 1), "float32")
    assert not analysis.analyze(teacher).groups["stem"].prunable
    monkeypatch.setattr(channels, "_REGISTRY", dict(channels._REGISTRY))  # the global registry, restored after
    tfsubspace.register_layer_handler(L.LayerNormalization, channels.PrunableLayerNorm())
    result = tfsubspace.compress(
        teacher,
        images,
        work_dir=tmp_path,
        epochs=2,
        recover_epochs=1,
        width_ratio=1.0,  # the student starts at full width: the budget's cut goes through the stream
        target_params=0.3,
        multiple=1,
        verbose=0,
        stats_batches=2,
        bn_batches=2,
    )
    report = result.report
    assert report["student"]["params"] <= 0.3 * report["teacher"]["params"]
    slim = analysis.analyze(result.student)
    assert slim.groups["stem"].size < 32  # the residual stream itself is narrower
    # the final cut (LASSO's zeros and the budget) reports the normalizations it moved, when it cut the stream
    stream_cut = not PruningPlan.load(tmp_path / "plan_lasso.json").masks()["stem"].all()
    moved = {a["layer"] for a in report["surgery"]["approximations"]}
    assert stream_cut and moved and moved <= {"ln0", "ln1", "ln_out"}
    assert all(a["max_abs_diff"] > 0 for a in report["surgery"]["approximations"])
