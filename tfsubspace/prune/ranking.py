"""Channel scores and pruning plans that meet a parameter or MAC budget.

Every pruning method in tfsubspace ends the same way: a score per prunable channel, then the
lowest-scored channels removed until the model fits a budget. How scores compare across
groups is the method's choice (`compare`):
- "normalized": each score over its group's mean (tfsubspace's LASSO: channels compete
  with their own layer, relative shares count);
- "rank": each score's rank within its group (Li et al.'s L1-norm filter pruning with one
  pruning ratio for every layer);
- "raw": scores as they are, one global threshold (Network Slimming's BN scales).
Kept counts are rounded up to a multiple with the strongest channels, and every group and
every layer keeps at least one channel.
"""

from __future__ import annotations

import bisect

import keras
import numpy as np

from tfsubspace.prune import channels, cost
from tfsubspace.prune.analysis import ChannelAnalysis
from tfsubspace.prune.index import ChannelIndex
from tfsubspace.prune.plan import PruningPlan

COMPARE = ("normalized", "rank", "raw")
# the step-for-step refinement of a MAC or latency cut (_meet_budget): its rounds, the groups it
# tries per round (those whose step saves most), and how much more score than the plain cut a plan
# may remove for spending more of the budget
_REFINE_ROUNDS = 2
_REFINE_GROUPS = 3
_REFINE_SCORE = 1.1


def filter_l1_norms(analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
    """Per prunable channel, the L1 norm of its output filters (summed over the layers that
    produce it): the score of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017)."""
    index = ChannelIndex(analysis)
    total = np.zeros(index.num_channels)
    for node, _, channel_index in index.producers():
        axis = analysis.handler_for(node.layer).output_axis
        kernel = keras.ops.convert_to_numpy(channels.filters(channels.kernel_of(node.layer), axis))
        np.add.at(total, channel_index, np.abs(kernel).sum(axis=0))
    return index.split(total)


def plan_for_budget(
    analysis: ChannelAnalysis,
    scores: dict[str, np.ndarray],
    *,
    params: float | None = None,
    macs: float | None = None,
    latency_ms: float | None = None,
    latency=None,
    compare: str = "normalized",
    multiple: int = 1,
    keep: dict[str, np.ndarray] | None = None,
) -> PruningPlan:
    """The plan that removes the fewest lowest-scored channels for the model to have at most
    `params` parameters, `macs` MACs per image and `latency_ms` milliseconds as `latency` (a
    tfsubspace.edge.latency.LatencyTable of the model) prices it (None: no limit).

    `keep` (boolean masks per group) starts from channels already chosen (others are gone);
    groups missing from `scores` are kept whole.
    """
    if compare not in COMPARE:
        raise ValueError(f"compare must be one of {COMPARE}. Received: compare={compare!r}")
    if latency_ms is not None and latency is None:
        raise ValueError("A latency_ms budget needs the model's latency table (latency=).")
    scores = {g: np.asarray(s, dtype=np.float64) for g, s in scores.items()}
    masks = {g: (np.ones(len(s), bool) if keep is None else np.array(keep[g], bool)) for g, s in scores.items()}
    for g, mask in masks.items():
        if not mask.any():
            mask[int(np.argmax(scores[g]))] = True

    def finish(trial):
        plan = PruningPlan.from_masks(analysis, trial).round_up(multiple, scores=scores)
        return ensure_every_layer_kept(analysis, plan, scores)

    pricer = cost.PlanCost(analysis, latency=latency if latency_ms is not None else None)
    budgets = {"params": params, "macs": macs, "latency_ms": latency_ms}
    if any(v is not None for v in budgets.values()):
        masks = _meet_budget(analysis, pricer, _comparable(scores, masks, compare), masks, budgets, finish, multiple)
    return finish(masks)


def _comparable(scores, masks, compare):
    if compare == "raw":
        return scores
    if compare == "rank":  # quantile within the group: every group loses the same share
        return {g: (np.argsort(np.argsort(s, kind="stable"), kind="stable") + 1) / len(s) for g, s in scores.items()}
    return {g: s / max(float(s[masks[g]].mean()) if masks[g].any() else 1.0, 1e-12) for g, s in scores.items()}


def _meet_budget(analysis, pricer, comparable, masks, budgets, finish, multiple=1):
    """Removes the fewest channels that make the plan fit the budgets: the lowest-scored
    first until the parameter budget holds, then, while MACs (then latency) are still over
    their budget, the channels whose score per MAC (per millisecond) they cost is lowest. One
    score order for all would stop only when MACs fit, taking from the late, parameter-heavy
    groups as many channels as from the early, full-resolution ones that hold the MACs: far
    more parameters than either budget asks. What a channel costs is what removing
    `multiple` channels of its group saves, per channel: plans are rounded up to that
    multiple, and the runtime's kernels step at theirs (latency), so one channel alone would
    mostly save nothing.
    """

    def spent(trial):
        return pricer(analysis.keep_vector(finish(trial).masks()))

    def fits(trial, names=tuple(budgets)):
        c = spent(trial)
        return all(budgets[n] is None or getattr(c, n) <= budgets[n] for n in names)

    start = masks
    masks = _remove_until(masks, comparable, lambda t: fits(t, ("params",)))
    over = [n for n in ("macs", "latency_ms") if budgets[n] is not None]
    if not over or fits(masks):
        return masks

    def per_unit(trial, name):  # score over what one channel of its group costs at these widths
        total = getattr(spent(trial), name)
        out = {}
        for g, mask in trial.items():
            if mask.sum() <= 1:  # nothing left to remove: its cost counts as 1 unit
                out[g] = comparable[g]
                continue
            fewer = {h: m.copy() for h, m in trial.items()}
            kept = np.flatnonzero(mask)
            step = min(len(kept) - 1, max(multiple, 1))
            fewer[g][kept[:step]] = False
            saved = (total - getattr(spent(fewer), name)) / step
            out[g] = comparable[g] / max(saved, 1e-9 if name == "latency_ms" else 1)
        return out

    def give_back(slim):
        # The cuts leave parameters unspent (MACs sit in the early groups, parameters in the
        # late ones): give back the removed channels worth most per unit they cost at the new
        # widths while every budget holds.
        ratio = per_unit(slim, over[-1])
        removed = sorted((-float(ratio[g][i]), g, i) for g in start for i in np.flatnonzero(start[g] & ~slim[g]))

        def with_back(count):
            trial = {g: m.copy() for g, m in slim.items()}
            for _, g, i in removed[:count]:
                trial[g][i] = True
            return trial

        # the most given back that still fits: the count before the first that does not
        return with_back(bisect.bisect_left(range(1, len(removed) + 1), True, key=lambda c: not fits(with_back(c))))

    def lost(trial):  # the score the finished plan removes from `masks`
        kept = finish(trial).masks()
        return sum(float(comparable[g][masks[g] & ~kept[g]].sum()) for g in masks)

    slim = masks
    for i, name in enumerate(over):
        slim = _remove_until(slim, per_unit(slim, name), lambda t, names=tuple(over[: i + 1]): fits(t, names))
    best = give_back(slim)

    # Channels go in whole steps of `multiple`, and the step of lowest score per unit of cost
    # can save far more than was still over (a step of an early, full-resolution group), leaving
    # the plan well under its budget (a 3x latency budget met at 3.6x). So also try the
    # _REFINE_GROUPS groups that lost channels whose step saves most, each with one step fewer
    # lost and the budget met from the other groups instead, and keep the plan that spends most
    # of the budget among those that remove at most _REFINE_SCORE times the score of the first;
    # again from that plan while one spends more.
    step = max(multiple, 1)

    def used(trial):
        return getattr(spent(trial), over[-1])

    def used_with_step_back(kept, g):  # the larger, the more one step of g saves
        back = np.flatnonzero(masks[g] & ~kept[g])
        trial = {h: m.copy() for h, m in kept.items()}
        trial[g][back[np.argsort(-comparable[g][back], kind="stable")][:step]] = True
        return used(trial)

    limit = _REFINE_SCORE * lost(best)
    order = per_unit(masks, over[-1])
    for _ in range(_REFINE_ROUNDS):
        kept = finish(best).masks()
        lost_count = {g: int((masks[g] & ~kept[g]).sum()) for g in masks}
        cut = sorted((g for g in masks if lost_count[g] >= step), key=lambda g: -used_with_step_back(kept, g))
        alternatives = []
        for g in cut[:_REFINE_GROUPS]:
            # g may lose only its lowest lost_count[g] - step channels before every other one
            ranked = np.flatnonzero(masks[g])[np.argsort(order[g][masks[g]], kind="stable")]
            limited = np.full(len(order[g]), np.inf)
            limited[ranked[: lost_count[g] - step]] = order[g][ranked[: lost_count[g] - step]]
            trial = _remove_until(masks, {**order, g: limited}, fits)
            if fits(trial):
                alternatives.append(give_back(trial))
        best_used = used(best)
        better = [t for t in alternatives if lost(t) <= limit and used(t) > best_used + 1e-12]
        if not better:
            break
        best = max(better, key=used)
    return best


def _remove_until(masks, order, fits):
    """The kept channels of `masks` with the fewest lowest-`order` ones removed for `fits`;
    every group keeps its best channel."""
    candidates = sorted((float(order[g][i]), g, i) for g in masks for i in np.nonzero(masks[g])[0])

    def plan_for(count):
        trial = {g: m.copy() for g, m in masks.items()}
        for _, g, i in candidates[:count]:
            trial[g][i] = False
        for g, m in trial.items():
            if not m.any():
                m[int(np.argmax(np.where(masks[g], order[g], -np.inf)))] = True
        return trial

    if fits(plan_for(0)):
        return masks
    # binary search: removing more never adds parameters or MACs (all of them when none fits)
    return plan_for(bisect.bisect_left(range(len(candidates)), True, key=lambda c: fits(plan_for(c))))


def ensure_every_layer_kept(analysis, plan, scores):
    """Adds back the strongest channel of any layer the plan would empty (merged groups)."""
    masks = plan.masks()
    for node in analysis.graph.walk():
        ref = node.outputs[0]
        if analysis.kept_positions(ref, analysis.keep_vector(masks)).size:
            continue
        candidates = [analysis.channel_position(int(c)) for c in analysis.ids[ref.key]]
        candidates = [p for p in candidates if p is not None]
        if not candidates:
            continue
        g, i = max(candidates, key=lambda p: float(scores.get(p[0], np.zeros(p[1] + 1))[p[1]]))
        masks[g][i] = True
    return PruningPlan(
        plan.model,
        plan.fingerprint,
        {g: {"size": plan.groups[g]["size"], "keep": [int(i) for i in np.nonzero(m)[0]]} for g, m in masks.items()},
    )
