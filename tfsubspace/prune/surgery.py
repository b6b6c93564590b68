"""Surgery: rebuild a physically slimmer Keras model from a pruning plan, and prove it.

A `PruningPlan` (tfsubspace.prune.plan) keeps, for each channel group of a model
(tfsubspace.prune.analysis), the indices of the channels to keep. `apply_plan(model, plan)`
builds a new model whose layers have only those channels, with weights sliced from the
original, and checks it against `masked_predict(model, plan, x)`: the original model run with
every removed channel forced to zero wherever it appears. The two agree up to float rounding,
or surgery fails.

A removed channel can still carry a non-zero constant in the original (act(beta) after a
BatchNormalization whose conv filter LASSO zeroed). With `fold_constants=True` that constant
is folded into the bias of each consuming Conv/Dense, which makes the slim model reproduce
the original model itself; the fold is exact for Dense layers and for 'valid' or 1x1
convolutions, and off at the borders of 'same'-padded ones. Verification then compares the
slim model with the masked original that has the same folds, so an approximate fold hides no
other error, and each fold reports how far it moves its layer's output on the check batch.
Channels pruned across a LayerNormalization by opt-in (channels.PrunableLayerNorm) are checked
the same way: that layer computes as its slim counterpart does in the reference, and
`result.approximations` reports how far it moved.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from tfsubspace.errors import TfSubspaceError
from tfsubspace.models import stats
from tfsubspace.prune import channels, cost, graph
from tfsubspace.prune.analysis import ChannelAnalysis, analyze
from tfsubspace.prune.graph import Graph, substitute
from tfsubspace.prune.plan import PlanError, PruningPlan

__all__ = [
    "PlanError",
    "PruningPlan",
    "SurgeryResult",
    "VerificationError",
    "apply_plan",
    "format_report",
    "layer_report",
    "masked_predict",
    "plan_params",
]


class VerificationError(TfSubspaceError, AssertionError):
    """The slim model does not reproduce the masked model within the tolerance."""


@dataclasses.dataclass
class SurgeryResult:
    """What apply_plan() built: the slim model, its plan, how far it is from the original (and
    from its masked reference, check_diff) on the check batch, and each constant fold."""

    model: keras.Model
    plan: PruningPlan
    # slim vs masked original on the check batch (with fold_constants: the original's constants
    # included, so inexact folds count here; see check_diff for what is verified)
    max_abs_diff: float
    report: list[dict]  # per layer, see layer_report()
    # constant folds: layer, positions, folded, exact, max_abs_diff (at that layer's output)
    folds: list[dict]
    # slim vs the masked original with the same folds: float rounding, or surgery fails
    check_diff: float = math.nan
    # layers whose handler is inexact (channels pruned across a LayerNormalization, by opt-in):
    # layer, max_abs_diff (how far pruning moved its output on the check batch), scale (its output's max abs)
    approximations: list[dict] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- masked reference


def masked_predict(
    model: keras.Model,
    plan: PruningPlan,
    x,
    analysis: ChannelAnalysis | None = None,
    keep_constant: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Outputs of `model` on `x` with every removed channel forced to zero wherever it appears.

    `keep_constant` (per global channel, see _constant_channels) exempts removed channels that
    carry a constant from the masking, as fold_constants replaces them by bias terms.
    """
    analysis = analysis or analyze(model)
    plan.validate(analysis)
    passes = analysis.keep_vector(plan.masks())
    if keep_constant is not None:
        passes = passes | keep_constant

    def mask(node, out):
        m = passes[analysis.ids[node.outputs[0].key]]
        return out if m.all() else _zero_removed(out, m)

    values = _run_inputs(analysis, x)
    graph.run(analysis.graph, values, mask)
    return [keras.ops.convert_to_numpy(values[ref.key]) for ref in analysis.graph.outputs]


def _zero_removed(out, passes: np.ndarray):
    """`out` with zeros in the channels that do not pass, whatever they held (NaN or inf included,
    as a division by a removed channel leaves)."""
    return keras.ops.where(keras.ops.convert_to_tensor(passes), out, keras.ops.zeros_like(out))


def _run_inputs(analysis: ChannelAnalysis, x) -> dict:
    xs = x if isinstance(x, (list, tuple)) else [x]
    return {ref.key: keras.ops.convert_to_tensor(v) for ref, v in zip(analysis.graph.inputs, xs)}


def _constant_channels(analysis: ChannelAnalysis, kept: np.ndarray, x):
    """Which removed channels carry a constant in the original model, and the constants.

    A removed channel carries a constant when every layer producing it has an all-zero
    filter for it (so that its value depends on no input, whatever else is masked): e.g.
    act(beta) after a BatchNormalization. The constants are read off a run of the original
    on `x` at the input of every Conv/Dense, where they must indeed be the same over the
    batch and every pixel. Returns (per global channel: removed and constant; per producer
    path: the constant at each input position, NaN where it varies).
    """
    constant = ~kept
    for node in analysis.graph.walk():
        if isinstance(analysis.handler_for(node.layer), channels.Producer):
            layer = node.layer
            kernel = channels.filters(channels.kernel_of(layer), analysis.handler_for(layer).output_axis)
            live = np.any(keras.ops.convert_to_numpy(kernel) != 0, axis=0)
            constant[analysis.ids[node.outputs[0].key][live]] = False
    values = _run_inputs(analysis, x)
    graph.run(analysis.graph, values)
    per_node = {}
    for node in analysis.graph.walk():
        if not isinstance(analysis.handler_for(node.layer), channels.Producer):
            continue
        a = keras.ops.convert_to_numpy(values[node.inputs[0].key])
        a = a.reshape(-1, a.shape[-1])
        scale = np.maximum(1.0, np.abs(a).max(axis=0))
        same = a.max(axis=0) - a.min(axis=0) <= 1e-6 * scale
        per_node[node.path] = np.where(same, a[0], np.nan)
        ids = analysis.ids[node.inputs[0].key]
        constant[ids[~same]] = False
    return constant, per_node


# ---------------------------------------------------------------- surgery


def apply_plan(
    model: keras.Model,
    plan: PruningPlan,
    *,
    check_batch=None,
    tolerance: float = 1e-4,
    fold_constants: bool = False,
    analysis: ChannelAnalysis | None = None,
    verify: bool = True,
) -> SurgeryResult:
    """Builds the slim model of `plan` and verifies it against the masked original.

    Args:
        model: the original Functional or Sequential model.
        plan: the PruningPlan (made for this model).
        check_batch: inputs for the check; a batch of 4 standard-normal inputs by default.
        tolerance: largest allowed max-abs difference of the outputs (float32).
        fold_constants: fold the constants that removed channels carry into the biases of
            the Conv/Dense layers that read them (see the module docs). The slim model is
            checked against the masked original with the same folds; `max_abs_diff` then
            compares it with the original's constants instead, and each entry of `folds`
            has the fold's own deviation at its layer's output ("max_abs_diff").
        analysis: the model's ChannelAnalysis, if already made.
        verify: False skips the masked-model check and the layer report (for searches
            that only need the slim model's shape; max_abs_diff is then NaN).

    Raises:
        PlanError: the plan does not fit the model.
        VerificationError: the slim model misses the reference by more than `tolerance`,
            or a fold declared exact is not.
    """
    analysis = analysis or analyze(model)
    plan.validate(analysis)
    kept = analysis.keep_vector(plan.masks())
    if check_batch is None:
        rng = np.random.default_rng(0)
        check_batch = [rng.standard_normal((4, *ref.shape[1:])).astype(np.float32) for ref in analysis.graph.inputs]
        if len(check_batch) == 1:
            check_batch = check_batch[0]

    deltas, folds, keep_constant, carried = {}, [], None, {}
    if fold_constants:
        keep_constant, per_node = _constant_channels(analysis, kept, check_batch)
        for node in analysis.graph.walk():
            if node.path not in per_node:
                continue
            ids = analysis.ids[node.inputs[0].key]
            constants = np.where(keep_constant[ids], per_node[node.path], np.nan)
            carrying = np.count_nonzero(~np.isnan(constants) & (constants != 0))
            if not carrying:
                continue
            keep_in = analysis.kept_positions(node.inputs[0], kept)
            folded = analysis.handler_for(node.layer).fold_constants(node.layer, constants, keep_in)
            carried[node.path] = np.nan_to_num(constants)
            fold = {
                "layer": node.path,
                "positions": int(carrying),
                "folded": folded is not None,
                "exact": folded is not None and bool(folded[1]),
                "max_abs_diff": math.nan,
            }
            folds.append(fold)
            if folded is not None:
                deltas[node.path] = folded[0]

    built, weights = {}, []
    slim = _rebuild(analysis.graph, analysis, kept, deltas, built, weights)
    for layer, values, handler in weights:
        if channels.is_layer(layer):  # a keras.ops operation has no weights
            layer.set_weights(values)
        handler.weights_set(layer)
    if not verify:
        return SurgeryResult(slim, plan, float("nan"), [], folds)

    reference, deviations, approximations = _folded_reference(analysis, kept, check_batch, carried, deltas)
    produced = slim(check_batch, training=False)
    produced = [
        keras.ops.convert_to_numpy(p) for p in (produced if isinstance(produced, (list, tuple)) else [produced])
    ]
    check_diff = _max_abs_diff(reference, produced)
    if not check_diff <= tolerance:
        raise VerificationError(
            f"The slim model differs from the masked model{' with the same constant folds' if folds else ''} "
            f"by {check_diff:.3g} (max abs) on the check batch, above the tolerance {tolerance:g}."
        )
    for fold in folds:
        fold["max_abs_diff"], scale = deviations[fold["layer"]]
        # Relative to the layer's output size: inner activations need not be of order one.
        if fold["exact"] and not fold["max_abs_diff"] <= tolerance * max(1.0, scale):
            raise VerificationError(
                f"The constants folded into layer {fold['layer']!r} should reproduce its output exactly, "
                f"but it differs by {fold['max_abs_diff']:.3g} (max abs, output up to {scale:.3g}) on the "
                f"check batch."
            )
    diff = check_diff
    if folds or approximations:
        diff = _max_abs_diff(masked_predict(model, plan, check_batch, analysis, keep_constant), produced)
        if not diff <= tolerance and all(f["exact"] for f in folds) and not approximations:
            raise VerificationError(
                f"The slim model differs from the masked model by {diff:.3g} (max abs) on the check "
                f"batch, above the tolerance {tolerance:g}, though every constant fold is exact."
            )
    return SurgeryResult(slim, plan, diff, layer_report(model, slim), folds, check_diff, approximations)


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(u - v))) if u.size else 0.0 for u, v in zip(a, b))


def _folded_reference(analysis: ChannelAnalysis, kept: np.ndarray, x, carried: dict, deltas: dict):
    """The masked original as the slim model computes it, and how far each fold is off.

    Removed channels are zero everywhere, as in masked_predict; a layer that the original
    feeds removed constants (`carried`: per input position, the constant or 0) runs instead
    with the folded delta added to its bias, or without the constants where they could not be
    folded, as its slim counterpart does. That is exact whether or not a fold is, so one
    inexact fold leaves the rest of the model checked. The folded layers are copies made from
    the original weights, not by the handlers' slicing, so that the slim model's slices are
    checked too. A layer whose handler is inexact runs as its slim counterpart computes
    (handler.slim_output) wherever some of its input channels are removed. Returns (outputs,
    {layer path: (max abs deviation of the folded output from the output with the constants,
    max abs of the latter)}, [{layer, max_abs_diff, scale}: how far each inexact layer's output
    moved from the masked original's]).
    """
    deviations, approximations = {}, []
    values = _run_inputs(analysis, x)

    def step(node, out):
        passes = kept[analysis.ids[node.outputs[0].key]]
        mask = keras.ops.convert_to_tensor(passes.astype(np.float32))
        handler = analysis.handler_for(node.layer)
        passes_in = kept[analysis.ids[node.inputs[0].key]] if node.inputs else passes
        if not handler.exact and not passes_in.all():
            masked = keras.ops.convert_to_numpy(_zero_removed(out, passes))
            out = handler.slim_output(node.layer, values[node.inputs[0].key], passes_in)
            approximations.append(
                {
                    "layer": node.path,
                    "max_abs_diff": float(np.max(np.abs(keras.ops.convert_to_numpy(out) - masked))),
                    "scale": float(np.max(np.abs(masked))),
                }
            )
        if node.path in carried:
            inp = values[node.inputs[0].key]
            if node.path in deltas:
                out = _folded_copy(node.layer, deltas[node.path], inp.shape)(inp)
            want = node.layer(inp + keras.ops.cast(carried[node.path], inp.dtype))
            want = keras.ops.convert_to_numpy(want * mask)
            deviations[node.path] = (
                float(np.max(np.abs(want - keras.ops.convert_to_numpy(out * mask)))),
                float(np.max(np.abs(want))),
            )
        return out if passes.all() else _zero_removed(out, passes)

    graph.run(analysis.graph, values, step)
    outputs = [keras.ops.convert_to_numpy(values[ref.key]) for ref in analysis.graph.outputs]
    return outputs, deviations, approximations


def _folded_copy(layer, delta: np.ndarray, input_shape):
    """A full-width copy of Conv/Dense `layer` with `delta` added to its bias."""
    copy = type(layer).from_config({**layer.get_config(), "use_bias": True})
    copy.build(input_shape)
    values = layer.get_weights()  # kernel, bias (if any), then anything else the layer has
    if layer.use_bias:
        values[1] = values[1] + delta.astype(values[1].dtype)
    else:
        values.insert(1, delta.astype(values[0].dtype))
    copy.set_weights(values)
    return copy


def _rebuild(g: Graph, analysis, kept, deltas, built, weights) -> keras.Model:
    tensors, new_inputs = {}, []
    for ref, old in zip(g.inputs, g.model.inputs):
        width = len(analysis.kept_positions(ref, kept))
        tensors[ref.key] = keras.Input(batch_shape=(*ref.shape[:-1], width), name=old.name)
        new_inputs.append(tensors[ref.key])

    for node in g.nodes:
        layer = built.get(id(node.layer))
        if layer is None:
            if node.sub is not None:
                layer = _rebuild(node.sub, analysis, kept, deltas, built, weights)
            else:
                layer = _slim_layer(node, analysis, kept, deltas.get(node.path), weights)
            built[id(node.layer)] = layer
        args, kwargs = node.args, node.kwargs
        if node.sub is None:  # the slim call's own constants (an operation's per-channel ones, cut)
            keep_out = analysis.kept_positions(node.outputs[0], kept)
            args, kwargs = analysis.handler_for(node.layer).arguments(node.layer, args, kwargs, keep_out)
        out = layer(*substitute(args, tensors), **substitute(kwargs, tensors))
        for ref, t in zip(node.outputs, out if isinstance(out, (list, tuple)) else [out]):
            tensors[ref.key] = t
    outputs = [tensors[ref.key] for ref in g.outputs]
    return keras.Model(
        new_inputs if len(new_inputs) > 1 else new_inputs[0],
        outputs if len(outputs) > 1 else outputs[0],
        name=g.model.name,
    )


def _slim_layer(node, analysis, kept, delta, weights):
    """The rebuilt layer of `node`; its sliced weights go to `weights` (set once built)."""
    handler = analysis.handler_for(node.layer)
    keep_in = [analysis.kept_positions(ref, kept) for ref in node.inputs]
    keep_out = analysis.kept_positions(node.outputs[0], kept)
    values = handler.slice_weights(node.layer, keep_in, keep_out)
    if delta is None:
        layer = handler.rebuild(node.layer, keep_in, keep_out)
    elif node.layer.use_bias:
        values[-1] = values[-1] + delta[keep_out].astype(values[-1].dtype)
        layer = handler.rebuild(node.layer, keep_in, keep_out)
    else:
        values.append(delta[keep_out].astype(values[0].dtype))
        layer = handler.rebuild(node.layer, keep_in, keep_out, use_bias=True)
    weights.append((layer, values, handler))
    return layer


# ---------------------------------------------------------------- accounting


def plan_params(analysis: ChannelAnalysis, plan: PruningPlan) -> int:
    """The parameter count of the slim model of `plan`, computed from the plan alone (see
    tfsubspace.prune.cost, which prices MACs and latency too)."""
    return cost.plan_cost(analysis, plan).params


def layer_report(original: keras.Model, slim: keras.Model) -> list[dict]:
    """Per layer: output channels, params and MACs before and after."""
    before = {r.name: r for r in stats.layer_stats(original)}
    after = {r.name: r for r in stats.layer_stats(slim)}
    channels_of = {}
    for m, key in ((original, 0), (slim, 1)):
        for node in graph.trace(m).walk():  # shapes only: no channel handlers needed
            channels_of.setdefault(node.layer.name, [None, None])[key] = node.outputs[0].shape[-1]
    rows = []
    for name, b in before.items():
        a = after.get(name)
        ch = channels_of.get(name, [None, None])
        rows.append(
            {
                "layer": name,
                "type": b.class_name,
                "channels_before": ch[0],
                "channels_after": ch[1],
                "params_before": b.params,
                "params_after": a.params if a else 0,
                "macs_before": b.macs,
                "macs_after": a.macs if a else 0,
            }
        )
    return rows


def format_report(rows: list[dict]) -> str:
    """A Markdown table of layer_report() rows, with a total line."""
    lines = ["| layer | type | channels | params | MACs |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if not (r["params_before"] or r["macs_before"]):
            continue
        lines.append(
            f"| {r['layer']} | {r['type']} | {r['channels_before']} -> {r['channels_after']} | "
            f"{r['params_before']:,} -> {r['params_after']:,} | {r['macs_before']:,} -> {r['macs_after']:,} |"
        )
    pb, pa = sum(r["params_before"] for r in rows), sum(r["params_after"] for r in rows)
    mb, ma = sum(r["macs_before"] for r in rows), sum(r["macs_after"] for r in rows)
    lines.append(
        f"| **total** | | | {pb:,} -> {pa:,} ({100 * (1 - pa / max(pb, 1)):.1f}% removed) | "
        f"{mb:,} -> {ma:,} ({100 * (1 - ma / max(mb, 1)):.1f}% removed) |"
    )
    return "\n".join(lines)
