"""Latency tables: fitting the width multiples, measuring and caching per model and machine,
reading a device's op profile, and pricing pruning plans in milliseconds."""

import dataclasses
import json
import math

import keras
import numpy as np
import pytest

from tfsubspace import models
from tfsubspace.edge import latency
from tfsubspace.edge.latency import CallLatency, LatencyTable, LatencyTableError
from tfsubspace.models import stats
from tfsubspace.prune import analysis, cost, surgery
from tfsubspace.prune.graph import trace
from tfsubspace.prune.plan import PruningPlan


def up(n, m):
    return math.ceil(n / m) * m


# ---------------------------------------------------------------------------------------------
# Fitting


@pytest.mark.parametrize("m_in, m_out", [(1, 16), (1, 8), (1, 1), (8, 16)])
def test_fit_finds_the_multiples_that_made_the_times(m_in, m_out):
    work = (9 * 14 * 14, 0.0, 0.0)  # a 3x3 convolution at 14x14
    rng = np.random.default_rng(0)
    points = []
    for n_in, n_out in [(32, 32), (32, 8), (32, 9), (32, 16), (32, 17), (8, 32), (9, 32), (16, 32), (17, 32)]:
        ms = 0.002 + 3e-9 * work[0] * up(n_in, m_in) * up(n_out, m_out)
        points.append((n_in, n_out, ms * (1 + 0.02 * rng.standard_normal())))  # 2% timing noise
    fit = latency.fit_call(points, work)
    assert (fit.multiple_in, fit.multiple_out, fit.fast_multiple) == (m_in, m_out, 0)
    assert fit.intercept_ms >= 0 and fit.slope_ms > 0 and fit.error < 0.05
    call = fitted("conv", 32, 32, work, fit, points)
    for n_in, n_out, ms in points:
        assert call.ms(n_in, n_out) == pytest.approx(ms, rel=0.1)


def fitted(key, n_in, n_out, work, fit, points=()):
    return CallLatency(
        key,
        "Conv2D",
        n_in,
        n_out,
        work,
        fit.intercept_ms,
        fit.slope_ms,
        fit.multiple_in,
        fit.multiple_out,
        fit.fast_multiple,
        fit.fast_slope_ms,
        tuple(points),
    )


def test_fitted_latency_is_monotone_and_steps_at_the_multiple():
    work = (9 * 7 * 7, 0.0, 0.0)
    points = [(n_in, n_out, 0.001 + 2e-9 * work[0] * n_in * up(n_out, 16)) for n_in, n_out in latency_points()]
    call = fitted("c", 64, 64, work, latency.fit_call(points, work))
    grid = [[call.ms(i, o) for o in range(1, 65)] for i in range(1, 65)]
    assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)
    assert call.ms(64, 17) == call.ms(64, 32) > call.ms(64, 16) == call.ms(64, 1)
    assert call.ms(17, 64) > call.ms(16, 64)  # input channels are not rounded


def latency_points(full=64, probes=latency.PROBES):
    return [(full, full)] + [(full, w) for w in probes] + [(w, full) for w in probes]


def test_widths_at_a_larger_multiple_can_be_faster():
    """Kernels that process 32 channels at a time where the width allows it: 17..31 output
    channels cost two 16-channel blocks, 32 costs less."""
    work = (9 * 14 * 14, 0.0, 0.0)

    def ms(n_in, n_out):
        blocks = n_out // 32 * 1.5 if n_out % 32 == 0 else up(n_out, 16) / 16
        return 0.0005 + 1e-9 * work[0] * n_in * 16 * blocks

    points = [(n_in, n_out, ms(n_in, n_out)) for n_in, n_out in latency_points(128)]
    fit = latency.fit_call(points, work)
    assert (fit.multiple_in, fit.multiple_out, fit.fast_multiple) == (1, 16, 32)
    call = fitted("c", 128, 128, work, fit)
    for n_out in (16, 24, 32, 48, 64, 96, 128):
        assert call.ms(128, n_out) == pytest.approx(ms(128, n_out), rel=1e-6)
    assert call.ms(128, 24) > call.ms(128, 32)
    # without measurements on both sides of the larger multiple, no fast class is fitted
    plain = latency.fit_call([p for p in points if p[1] % 32], work)
    assert plain.fast_multiple == 0


def test_one_measurement_gives_a_line_through_zero():
    fit = latency.fit_call([(16, 16, 0.004)], (100.0, 0.0, 0.0))
    assert (fit.intercept_ms, fit.multiple_in, fit.multiple_out, fit.error) == (0.0, 1, 1, 0.0)
    assert fit.slope_ms == pytest.approx(0.004 / (100 * 16 * 16))


def test_the_step_is_the_multiple_of_the_calls_that_take_the_time():
    """A Dense head of a microsecond fits a multiple of 32 from noise (as VGG-16's did on this
    machine); the convolutions holding the time step at 16, and so do the plan's widths."""
    conv = CallLatency("conv", "Conv2D", 64, 64, (900.0, 0, 0), 0.001, 1e-8, 1, 16, 0, 0.0, ())
    head = CallLatency("fc", "Dense", 64, 64, (1.0, 0, 0), 0.0008, 1e-9, 1, 32, 0, 0.0, ())
    table = LatencyTable("m", "fp", "here", "measured", {"conv": conv, "fc": head}, 0.0)
    assert table.multiples() == {"conv": (1, 16), "fc": (1, 32)}
    assert table.step() == 16
    # where the 32-step calls hold most of the time, the step is theirs
    heavy = dataclasses.replace(head, slope_ms=1e-5)
    assert LatencyTable("m", "fp", "here", "measured", {"conv": conv, "fc": heavy}, 0.0).step() == 32


# ---------------------------------------------------------------------------------------------
# Measuring and caching (a fake timer: conversion and fitting are real, times are synthetic)


def tiny_cnn():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="fc")(x), name="tiny")


def fake_time_ms(calls):
    """A timer whose 'latency' steps with output channels in 16s, counting what it times."""

    def time_ms(runner, runs):
        calls.append(runs)
        n_in, n_out = int(runner.input["shape"][-1]), int(runner.output["shape"][-1])
        spatial = int(np.prod(runner.input["shape"][1:-1]))
        return 0.001 + 1e-6 * spatial * n_in * up(n_out, 16)

    return time_ms


def test_measured_table_is_cached_by_model_and_machine(tmp_path, monkeypatch):
    model = tiny_cnn()
    timed = []
    monkeypatch.setattr(latency, "_time_ms", fake_time_ms(timed))
    table = LatencyTable.measure(model, cache_dir=tmp_path, probes=(16, 17), rounds=2, runs=3, warmup=0)
    assert timed and set(timed) == {3}
    assert list(table.calls) == ["conv", "fc"]
    assert table.multiples()["conv"] == (1, 16)
    assert [p[:2] for p in table.calls["conv"].points] == [(3, 32), (3, 16), (3, 17)]
    assert [p[:2] for p in table.calls["fc"].points] == [(32, 4), (16, 4), (17, 4)]
    assert table.machine == latency.machine() and table.fingerprint == latency.fingerprint(model)
    # the whole model's time minus its calls' is the fixed term
    assert table.estimate() == pytest.approx(table.model_ms)
    files = list(tmp_path.glob("tiny-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["format"] == latency.TABLE_FORMAT

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency, "_time_ms", refuse)
    monkeypatch.setattr("tfsubspace.edge.convert.convert", refuse)
    again = LatencyTable.measure(tiny_cnn(), cache_dir=tmp_path, probes=(17, 16), rounds=2, runs=3, warmup=0)
    assert again == table
    # other settings, or another machine, is another table
    with pytest.raises(AssertionError, match="measured again"):
        LatencyTable.measure(model, cache_dir=tmp_path, probes=(16, 17), rounds=2, runs=4, warmup=0)
    monkeypatch.setattr(latency, "machine", lambda: "another machine")
    with pytest.raises(AssertionError, match="measured again"):
        LatencyTable.measure(model, cache_dir=tmp_path, probes=(16, 17), rounds=2, runs=3, warmup=0)


def test_models_are_timed_side_by_side():
    def conv(width):
        inputs = keras.Input((32, 32, 8))
        return keras.Model(inputs, keras.layers.Conv2D(width, 3, padding="same")(inputs))

    small, large = latency.measure_models([conv(8), conv(256)], rounds=2, runs=20)
    assert 0 < small < large  # 32 times the MACs


def test_files_are_timed_side_by_side_from_paths_or_contents(tmp_path):
    from tfsubspace.edge.convert import convert

    inputs = keras.Input((32, 32, 8))
    contents = [
        convert(keras.Model(inputs, keras.layers.Conv2D(w, 3, padding="same")(inputs)), "float32") for w in (8, 256)
    ]
    (tmp_path / "large.tflite").write_bytes(contents[1])
    small, large = latency.measure_files([contents[0], tmp_path / "large.tflite"], rounds=2, runs=20)
    assert 0 < small < large


def test_fingerprint_follows_layer_shapes_and_settings():
    assert latency.fingerprint(tiny_cnn()) == latency.fingerprint(tiny_cnn())
    wider = keras.Model(*_conv_model(32))
    strided = keras.Model(*_conv_model(16, strides=2))
    assert len({latency.fingerprint(m) for m in (tiny_cnn(), keras.Model(*_conv_model(16)), wider, strided)}) == 4


def _conv_model(filters, strides=1):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", name="conv")(inputs)
    return inputs, keras.layers.Dense(4, name="fc")(keras.layers.GlobalAveragePooling2D(name="gap")(x))


def test_damaged_cache_file_is_named(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(LatencyTableError, match="t.json"):
        LatencyTable.load(path)
    path.write_text(json.dumps({"format": latency.TABLE_FORMAT, "calls": [{"key": "x"}]}))
    with pytest.raises(LatencyTableError, match="damaged"):
        LatencyTable.load(path)


def test_shared_layer_calls_are_priced_each():
    inputs = keras.Input((8, 8, 4))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    x = conv(conv(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x)))
    assert [key for _, key in latency.call_keys(trace(model).walk())] == ["shared", "shared#1", "fc"]


# ---------------------------------------------------------------------------------------------
# Pricing plans


def synthetic_table(model, multiple_out=16):
    """A table with made-up (but width-dependent) per-call latencies: no measuring."""
    calls = {}
    for node, key in latency.call_keys(trace(model).walk()):
        n_in, n_out = int(node.inputs[0].shape[-1]), int(node.outputs[0].shape[-1])
        work = latency._work_coefficients(node.layer, node.inputs[0].shape, node.outputs[0].shape)
        calls[key] = CallLatency(
            key, type(node.layer).__name__, n_in, n_out, work, 0.001, 1e-9, 1, multiple_out, 32, 8e-10
        )
    elements = latency.element_count(model)
    return LatencyTable(
        model.name, latency.fingerprint(model), "test", "synthetic", calls, 0.01, None, {}, 2e-7, elements
    )


@pytest.mark.parametrize("name", ["vgg16", "wrn"])
def test_plan_cost_prices_latency_like_the_slim_model(name):
    model = models.build(name, (28, 28, 1), 10, **({"width": 0.25} if name == "vgg16" else {"widen_factor": 1}))
    an = analysis.analyze(model)
    table = synthetic_table(model)
    pricer = cost.PlanCost(an, latency=table)
    plain = cost.PlanCost(an)
    rng = np.random.default_rng(0)
    everything = an.keep_vector({})
    assert pricer(everything).latency_ms == pytest.approx(table.estimate())
    assert plain(everything) == cost.Cost(stats.count_params(model), stats.count_macs(model))
    for _ in range(3):
        masks = {n: rng.random(g.size) < 0.5 for n, g in an.groups.items() if g.prunable}
        for mask in masks.values():
            mask[0] = True
        plan = PruningPlan.from_masks(an, masks)
        slim = surgery.apply_plan(model, plan, analysis=an, verify=False).model
        priced = cost.plan_cost(an, plan, latency=table)
        assert priced.latency_ms == pytest.approx(table.estimate_model(slim))
        assert (priced.params, priced.macs) == (stats.count_params(slim), stats.count_macs(slim))
        assert cost.plan_cost(an, plan).latency_ms == 0.0
        group = sorted(masks)[len(masks) // 2]
        wider = {**masks, group: np.ones_like(masks[group])}
        before, after = an.keep_vector(masks), an.keep_vector(wider)
        change = pricer.change(before, after, group)
        assert change.latency_ms == pytest.approx((pricer(after) - pricer(before)).latency_ms)
        assert change.latency_ms >= 0


def test_table_of_another_model_is_refused():
    model = models.build("vgg16", (28, 28, 1), 10, width=0.25)
    other = synthetic_table(tiny_cnn())
    with pytest.raises(LatencyTableError, match="conv1"):
        cost.PlanCost(analysis.analyze(model), latency=other)
    with pytest.raises(LatencyTableError, match="nope"):
        other.estimate({"nope": (1, 1)})


# ---------------------------------------------------------------------------------------------
# Device op profiles (a CSV crafted after the format benchmark_model documents and writes;
# no profile from a real device is at hand)


def profiled_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.SeparableConv2D(24, 3, padding="same", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc")(x), name="profiled")


HEADER = "node type, first, avg_ms, %, cdf%, mem KB, times called, name"


def profile_csv(rows):
    """A benchmark_model op profile (CSV mode): an initialization section, then the regular
    runs' "Run Order" table (rows: node type, avg_ms, times called, name) and its "Top by
    Computation Time" table, which lists the same nodes again. Like the writer, commas in names
    become tabs; node types are written as they are."""
    total = sum(ms * n for _, ms, n, _ in rows)
    rows = [(t, ms, n, name.replace(",", "\t")) for t, ms, n, name in rows]
    lines = [
        "Profiling Info for Benchmark Initialization:",
        "============================== Run Order ==============================",
        HEADER,
        "ModifyGraphWithDelegate, 2.1, 2.1, 60%, 60%, 512, 1, ModifyGraphWithDelegate",
        "AllocateTensors, 1.4, 1.4, 40%, 100%, 128, 1, AllocateTensors",
        "",
        "Operator-wise Profiling Info for Regular Benchmark Runs:",
        "============================== Run Order ==============================",
        HEADER,
    ]
    table = [
        f"{t}, {ms * 1.1:.3f}, {ms:.3f}, {100 * ms * n / total:.3f}%, 0%, 0, {n}, {name}" for t, ms, n, name in rows
    ]
    lines += table + [
        "",
        "============================== Top by Computation Time ==============================",
        HEADER,
    ]
    lines += sorted(table, reverse=True) + ["", "Number of nodes executed: 7"]
    return "\n".join(lines) + "\n"


def test_op_profile_maps_ops_to_layers(tmp_path):
    rows = [
        ("CONV_2D", 0.120, 1, "[profiled/conv/BiasAdd;profiled/conv/Conv2D]:0"),
        ("MAX_POOL_2D", 0.010, 1, "[profiled/pool/MaxPool]:1"),
        ("DEPTHWISE_CONV_2D", 0.015, 1, "[profiled/dw/depthwise]:2"),
        ("DEPTHWISE_CONV_2D", 0.014, 1, "[profiled/sep/separable_conv2d/depthwise]:3"),
        ("CONV_2D", 0.030, 1, "[profiled/sep/BiasAdd;profiled/sep/separable_conv2d]:4"),
        ("MEAN", 0.004, 2, "[profiled/gap/Mean]:5"),
        ("FULLY_CONNECTED", 0.002, 1, "[profiled/fc/MatMul;profiled/fc/BiasAdd]:6"),
    ]
    path = tmp_path / "profile.csv"
    path.write_text(profile_csv(rows))
    model = profiled_model()
    table = LatencyTable.from_op_profile(path, model, multiple_out=8)
    assert list(table.calls) == ["conv", "dw", "sep", "fc"]
    full = {k: c.ms(c.width_in, c.width_out) for k, c in table.calls.items()}
    assert full == pytest.approx({"conv": 0.120, "dw": 0.015, "sep": 0.044, "fc": 0.002})
    # the other ops (pooling, mean) go with the elements of the calls without MACs
    assert table.overhead_ms == 0.0 and table.elements == latency.element_count(model) > 0
    assert table.element_ms * table.elements == pytest.approx(0.010 + 2 * 0.004)
    assert (
        table.estimate()
        == pytest.approx(table.model_ms)
        == pytest.approx(0.120 + 0.010 + 0.015 + 0.044 + 0.008 + 0.002)
    )
    conv = table.calls["conv"]
    assert (conv.multiple_in, conv.multiple_out) == (1, 8)
    assert conv.ms(3, 8) == pytest.approx(0.120 / 4) and conv.ms(3, 9) == conv.ms(3, 16) == pytest.approx(0.120 / 2)
    assert table.source == "op_profile" and "profile.csv" in table.machine


def test_op_profile_reads_xnnpack_op_names(tmp_path):
    rows = [
        ("Convolution (NHWC, F32) IGEMM", 0.1, 1, "Delegate/Convolution (NHWC, F32) IGEMM:0"),
        ("Max Pooling (NHWC, F32)", 0.01, 1, "Delegate/Max Pooling (NHWC, F32):1"),
        ("Convolution (NHWC, F32) DWConv", 0.02, 1, "Delegate/Convolution (NHWC, F32) DWConv:2"),
        ("Convolution (NHWC, F32) DWConv", 0.02, 1, "Delegate/Convolution (NHWC, F32) DWConv:3"),
        ("Convolution (NHWC, F32) GEMM", 0.03, 1, "Delegate/Convolution (NHWC, F32) GEMM:4"),
        ("Global Average Pooling (NWC, F32)", 0.003, 1, "Delegate/Global Average Pooling (NWC, F32):5"),
        ("Fully Connected (NC, F32) GEMM", 0.002, 1, "Delegate/Fully Connected (NC, F32) GEMM:6"),
    ]
    path = tmp_path / "xnnpack.csv"
    path.write_text(profile_csv(rows))
    table = LatencyTable.from_op_profile(path, profiled_model())
    assert table.calls["sep"].ms(32, 24) == pytest.approx(0.02 + 0.03)
    assert table.element_ms * table.elements == pytest.approx(0.01 + 0.003)


def test_op_profile_of_another_model_names_the_layer(tmp_path):
    rows = [
        ("CONV_2D", 0.12, 1, "a"),
        ("CONV_2D", 0.02, 1, "b"),
        ("DEPTHWISE_CONV_2D", 0.01, 1, "c"),
        ("CONV_2D", 0.03, 1, "d"),
        ("FULLY_CONNECTED", 0.002, 1, "e"),
    ]
    path = tmp_path / "other.csv"
    path.write_text(profile_csv(rows))
    with pytest.raises(LatencyTableError, match=r"other.csv.*'CONV_2D'.*layer 'dw'"):
        LatencyTable.from_op_profile(path, profiled_model())
    path.write_text(profile_csv(rows[:1]))
    with pytest.raises(LatencyTableError, match="none left for layer 'dw'"):
        LatencyTable.from_op_profile(path, profiled_model())


def test_op_profile_without_the_regular_runs_is_named(tmp_path):
    path = tmp_path / "stdout.txt"
    path.write_text("INFO: Inference timings in us: Init: 3, First inference: 4\n")
    with pytest.raises(LatencyTableError, match="stdout.txt.*op_profiling_output_mode=csv"):
        LatencyTable.from_op_profile(path, profiled_model())
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        LatencyTable.from_op_profile(tmp_path / "missing.csv", profiled_model())


def test_a_model_without_element_wise_calls_keeps_a_fixed_overhead(tmp_path, monkeypatch):
    """Only MAC calls (nothing to price per element, no prunable group for a half-width model):
    the whole model's time beyond its call is all fixed overhead, even when it is negative."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(inputs), name="dense_only")
    monkeypatch.setattr(latency, "measure_files", lambda contents, **kwargs: [0.010] * (len(contents) - 1) + [0.005])
    table = LatencyTable.measure(model, cache=False)
    assert table.elements == 0 and table.element_ms == 0.0
    assert table.overhead_ms == pytest.approx(-0.005) and table.estimate() == pytest.approx(0.005)
