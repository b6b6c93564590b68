"""Widths chosen for a budget: plan costs without surgery, the output-weighted value of each
latent direction, the search that spends the budget, and compress()'s default budget."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfsubspace
from tfsubspace import models
from tfsubspace.distill import subspace
from tfsubspace.distill.pipeline import DEFAULT_TARGET_PARAMS, CompressionConfig
from tfsubspace.models import stats
from tfsubspace.prune import analysis, cost, surgery
from tfsubspace.prune.plan import PruningPlan


def random_masks(an, rng, share=0.6):
    masks = {name: rng.random(g.size) < share for name, g in an.groups.items() if g.prunable}
    for mask in masks.values():
        mask[rng.integers(len(mask))] = True
    return masks


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.build("vgg16", (28, 28, 1), 10, width=0.25),
        lambda: models.build("wrn", (28, 28, 1), 10, depth=10, widen_factor=1),
        lambda: models.build("lenet5", (28, 28, 1), 10),
        lambda: keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
    ],
)
def test_plan_cost_is_the_slim_models_count(build):
    model = build()
    an = analysis.analyze(model)
    rng = np.random.default_rng(0)
    pricer = cost.PlanCost(an)
    for _ in range(2):
        masks = random_masks(an, rng)
        plan = PruningPlan.from_masks(an, masks)
        slim = surgery.apply_plan(model, plan, analysis=an, verify=False).model
        priced = cost.plan_cost(an, plan)
        assert priced == cost.Cost(stats.count_params(slim), stats.count_macs(slim))
        assert priced.params == surgery.plan_params(an, plan)
        # changing one group re-prices only its calls, to the same total
        group = next(iter(masks))
        wider = {**masks, group: np.ones_like(masks[group])}
        before, after = an.keep_vector(masks), an.keep_vector(wider)
        assert pricer.change(before, after, group) == pricer(after) - pricer(before)


def _two_branch_teacher():
    """Two parallel convolutions: the output reads only the first (the second's Dense weights
    are zero), though the second's latent has far more energy."""
    keras.utils.set_random_seed(0)  # the first convolution's initial weights
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(16, 3, padding="same", name="seen")(inputs)
    b = keras.layers.Conv2D(16, 3, padding="same", name="ignored")(inputs)
    x = keras.layers.Concatenate(name="cat")([keras.layers.ReLU(name="ra")(a), keras.layers.ReLU(name="rb")(b)])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    rng = np.random.default_rng(0)
    model.get_layer("ignored").set_weights([10 * rng.standard_normal((3, 3, 1, 16)), np.zeros(16)])
    kernel, bias = model.get_layer("logits").get_weights()
    kernel[16:] = 0.0
    model.get_layer("logits").set_weights([kernel, bias])
    return model


def test_directions_are_worth_what_the_output_depends_on():
    model = _two_branch_teacher()
    an = analysis.analyze(model)
    images = tf.data.Dataset.from_tensor_slices(np.random.default_rng(1).random((64, 8, 8, 1), "float32")).batch(16)
    latents = subspace.latent_statistics(model, images, an, progress=False)
    assert set(latents) == {"seen", "ignored"}
    energy = {g: subspace.direction_values(st) for g, st in latents.items()}
    assert energy["ignored"].sum() > 10 * energy["seen"].sum()  # by energy, the ignored branch wins
    sensitivity = subspace.output_sensitivity(model, images, an, list(latents))
    worth = {g: subspace.direction_values(st, sensitivity[g]) for g, st in latents.items()}
    assert worth["ignored"].max() == 0.0
    assert worth["seen"].max() > 0.0
    # under a budget, the search widens the branch the output reads and leaves the other narrowest
    budget = cost.plan_cost(an, PruningPlan.from_masks(an, {"seen": np.ones(16, bool), "ignored": np.eye(16)[0] > 0}))
    dims = subspace.dimensions_for_budget(latents, worth, an, params=budget.params, multiple=1)
    assert dims == {"seen": 16, "ignored": 1}
    dims = subspace.dimensions_for_budget(latents, energy, an, params=budget.params, multiple=1)
    assert dims["ignored"] > dims["seen"]


@pytest.mark.parametrize("budget", [{"params": 0.3}, {"macs": 0.4}, {"params": 0.25, "macs": 0.5}])
def test_the_search_spends_the_budget_and_no_more(budget):
    model = models.build("vgg16", (28, 28, 1), 10, width=0.25)
    an = analysis.analyze(model)
    rng = np.random.default_rng(2)
    images = tf.data.Dataset.from_tensor_slices(rng.random((64, 28, 28, 1), "float32")).batch(32)
    latents = subspace.latent_statistics(model, images, an, progress=False)
    values = {g: subspace.direction_values(st) for g, st in latents.items()}
    full = cost.plan_cost(an, PruningPlan.from_masks(an, {}))
    limits = {name: share * getattr(full, name) for name, share in budget.items()}
    dims = subspace.dimensions_for_budget(latents, values, an, multiple=8, **limits)

    def priced(dims):
        return cost.plan_cost(an, PruningPlan.from_masks(an, subspace.top_channels(latents, dims)))

    spent = priced(dims)
    assert all(getattr(spent, name) <= limit for name, limit in limits.items())
    assert all(k % 8 == 0 or k == len(latents[g].total) for g, k in dims.items())
    # no group can take its next 8 channels within the budget
    for g, k in dims.items():
        if k < len(latents[g].total):
            grown = priced({**dims, g: min(k + 8, len(latents[g].total))})
            assert any(getattr(grown, name) > limit for name, limit in limits.items()), g
    # a budget the narrowest widths already exceed returns them
    tight = subspace.dimensions_for_budget(latents, values, an, params=1000, multiple=8)
    assert tight == dict.fromkeys(latents, 8)


def test_the_default_is_the_papers_compression():
    config = CompressionConfig()
    assert config.width_rule == "budget"
    assert config.with_default_budget().target_params == DEFAULT_TARGET_PARAMS == 0.2
    assert CompressionConfig(energy=0.99).with_default_budget().target_params is None
    assert CompressionConfig(target_macs=0.5).with_default_budget().target_params is None
    with pytest.raises(ValueError, match="Give energy or width_ratio, not both"):
        CompressionConfig(energy=0.9, width_ratio=0.5).validate()
    with pytest.raises(ValueError, match="headroom must be at least 1"):
        CompressionConfig(headroom=0.5).validate()
    with pytest.raises(ValueError, match="measure_latency must be one of"):
        CompressionConfig(measure_latency="yes").validate()
    with pytest.raises(ValueError, match="calibrate_latency must be True or False"):
        CompressionConfig(calibrate_latency="yes").validate()
    # calibrate_latency shapes the student only under a latency budget: only there in the manifest
    assert "calibrate_latency" not in CompressionConfig(target_macs=0.5).manifest()
    assert CompressionConfig(target_speedup=2.0).manifest()["calibrate_latency"] is True


@pytest.mark.slow
def test_compress_with_only_a_model_and_images_removes_about_80_percent():
    keras.utils.set_random_seed(0)
    model = models.build("vgg16", (28, 28, 1), 10, width=0.25)
    images = np.random.default_rng(3).random((256, 28, 28, 1), "float32")
    result = tfsubspace.compress(model, images, epochs=1, recover_epochs=0, stats_batches=2, bn_batches=2, verbose=0)
    report = result.report
    assert report["budgets"]["params"]["met"]
    assert 0.78 <= report["params_removed"] <= 0.85, report["params_removed"]
    assert result.student.count_params() == surgery.plan_params(analysis.analyze(model), result.plan)


def _two_conv_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))


@pytest.mark.slow
def test_a_speedup_budget_is_planned_and_reported(tmp_path):
    """target_speedup: the latency table of the teacher prices every plan; the student meets
    the budget by the table's estimate, and the report says so."""
    model = _two_conv_model()
    images = np.random.default_rng(4).random((128, 16, 16, 1), "float32")
    result = tfsubspace.compress(
        model, images, target_speedup=2.0, epochs=1, recover_epochs=0, stats_batches=2, bn_batches=2, verbose=0
    )
    report = result.report
    latency = report["latency"]
    budget = report["budgets"]["latency_ms"]
    # the cut was timed here, and made again where the timing missed 2x by more than 5%
    calibration = latency["calibration"]
    assert budget.get("asked", budget["target"]) == pytest.approx(latency["teacher_ms"] / 2, rel=1e-4)
    assert budget["target"] == pytest.approx(calibration["rounds"][calibration["chosen"]]["budget_ms"], rel=1e-4)
    assert ("asked" in budget) == (calibration["chosen"] > 0)
    assert latency["student_ms"] <= budget["target"] * 1.01 and budget["met"]
    assert "target_params" not in report["budgets"] and "params" not in report["budgets"]
    # under a latency budget the files are also timed side by side (measure_latency="auto")
    measured = latency["measured"]
    assert measured["speedup"] == pytest.approx(measured["teacher_ms"] / measured["student_ms"])
    assert measured["speedup"] > 1, measured  # a student of half the table's latency runs faster
    assert report["budgets"]["latency_ms"]["measured"] == pytest.approx(measured["student_ms"], rel=1e-5)
    assert "latency (estimated here)" in result.summary() and "latency (measured here)" in result.summary()


@pytest.mark.slow
def test_a_speedup_measured_short_of_the_one_asked_is_warned_about(monkeypatch):
    from tfsubspace.edge import latency

    timed = latency.measure_files  # the latency table's own files are timed for real

    def measure_files(files, **kw):  # the teacher and the student (the fake float32_tflite's models): 1.25x
        return [1.0, 0.8] if all(isinstance(f, keras.Model) for f in files) else timed(files, **kw)

    monkeypatch.setattr(latency, "float32_tflite", lambda model: model)
    monkeypatch.setattr(latency, "measure_files", measure_files)
    images = np.random.default_rng(4).random((64, 16, 16, 1), "float32")
    with pytest.warns(UserWarning, match="measured 1.25x faster than the teacher's here, more than 10% short"):
        result = tfsubspace.compress(
            _two_conv_model(), images, target_speedup=2.0, epochs=1, recover_epochs=0, stats_batches=2, verbose=0
        )
    assert result.report["latency"]["measured"]["speedup"] == pytest.approx(1.25)


@pytest.mark.slow
@pytest.mark.parametrize("slower", [1.4, 1.0])
def test_a_latency_cut_is_calibrated_by_timing_it(monkeypatch, slower):
    """Where the student times `slower` times what the latency table estimates, the final cut is
    made again for a budget corrected by the miss, and the report says so; where the timing
    agrees with the table, the first cut is kept."""
    from test_latency import synthetic_table

    from tfsubspace.edge import latency

    monkeypatch.setattr(latency.LatencyTable, "measure", classmethod(lambda cls, model, **kw: synthetic_table(model)))

    converted = []

    def float32_tflite(model):  # the model itself stands for its file
        converted.append(model)
        return model

    def measure_files(files, **kw):  # the teacher as the table says, the student `slower`
        teacher, student = files
        table = synthetic_table(teacher)
        return [table.estimate(), slower * table.estimate_model(student)]

    monkeypatch.setattr(latency, "float32_tflite", float32_tflite)
    monkeypatch.setattr(latency, "measure_files", measure_files)
    images = np.random.default_rng(6).random((64, 16, 16, 1), "float32")
    result = tfsubspace.compress(
        _wide_conv_model(), images, target_speedup=2.0, epochs=1, recover_epochs=0, stats_batches=2, verbose=0
    )
    report = result.report
    rounds, chosen = report["latency"]["calibration"]["rounds"], report["latency"]["calibration"]["chosen"]
    budget = report["latency"]["teacher_ms"] / 2
    assert rounds[0]["budget_ms"] == pytest.approx(budget)
    for r in rounds:
        assert r["speedup"] == pytest.approx(r["teacher_ms"] / r["student_ms"])
        assert r["miss"] == pytest.approx(r["speedup"] / 2)
        assert r["student_ms"] == pytest.approx(slower * r["estimated_ms"])
    # a student per round and the final one for the report; the teacher once for all of them
    assert len(converted) == len(rounds) + 2
    # the timing of the final student is the chosen round's
    assert report["latency"]["measured"]["student_ms"] == pytest.approx(rounds[chosen]["student_ms"], rel=1e-6)
    if slower == 1.0:
        assert len(rounds) == 1 and chosen == 0 and "asked" not in report["budgets"]["latency_ms"]
        return
    # 40% slower than estimated: the first cut times about 1.4x short of 2x; the calibrated one
    # is cut to a budget 1/1.4 of it and times within a step of 2x
    assert rounds[0]["miss"] < 0.8
    assert len(rounds) >= 2 and chosen >= 1
    assert rounds[1]["budget_ms"] == pytest.approx(rounds[0]["estimated_ms"] * rounds[0]["miss"])
    assert abs(np.log(rounds[chosen]["miss"])) < abs(np.log(rounds[0]["miss"]))
    assert report["budgets"]["latency_ms"]["asked"] == pytest.approx(budget, rel=1e-5)
    assert report["budgets"]["latency_ms"]["target"] == pytest.approx(rounds[chosen]["budget_ms"], rel=1e-5)
    assert report["budgets"]["latency_ms"]["met"]
    assert "calibrated by timing the cut" in result.summary()


def _wide_conv_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))


@pytest.mark.slow
def test_a_mac_budget_steps_widths_as_the_kernels_do_where_it_can(monkeypatch):
    """Under target_macs, widths step at the latency table's output multiple (16 here) when the
    budget can be met at it, else at 8; an explicit multiple is kept."""
    from test_latency import synthetic_table

    from tfsubspace.edge import latency

    monkeypatch.setattr(latency.LatencyTable, "measure", classmethod(lambda cls, model, **kw: synthetic_table(model)))
    images = np.random.default_rng(5).random((64, 16, 16, 1), "float32")
    options = dict(epochs=1, recover_epochs=0, stats_batches=2, bn_batches=2, verbose=0, measure_latency="none")

    def widths(**budget):
        result = tfsubspace.compress(_two_conv_model(), images, **options, **budget)
        assert result.report["budgets"]["macs"]["met"], result.report["budgets"]
        return [len(result.plan.groups[name]["keep"]) for name in ("c1", "c2")]

    # c1 32 and c2 64 channels: at their narrowest 16 each, 13% of the MACs; at 8 each, 3.4%
    assert all(k % 16 == 0 for k in widths(target_macs=0.5))
    stepped_at_8 = widths(target_macs=0.08)  # under 13%: 16-channel steps cannot meet it
    assert all(k % 8 == 0 for k in stepped_at_8) and any(k % 16 for k in stepped_at_8)
    assert all(k % 4 == 0 for k in widths(target_macs=0.5, multiple=4))

    def unmeasurable(cls, model, **kw):
        raise RuntimeError("no LiteRT here")

    monkeypatch.setattr(latency.LatencyTable, "measure", classmethod(unmeasurable))
    with pytest.warns(UserWarning, match="latency table could not be measured.*no LiteRT here.*step at 8"):
        assert all(k % 8 == 0 for k in widths(target_macs=0.5))
