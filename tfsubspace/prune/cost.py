"""What a pruning plan costs, computed from the plan alone (no slim model is built): the
parameters and the multiply-accumulates per image of the model it would give, by the same
rules as `models.stats` (each layer's handler counts its parameters; every call of a layer
counts its MACs). `PlanCost` prices many plans of one model quickly: changing one group's
channels re-prices only the layer calls that read or write them, which is what a search over
widths (thousands of trial plans) needs. Given a latency table (tfsubspace.edge.latency) of the
model, it prices the plan's latency in milliseconds too."""

from __future__ import annotations

import dataclasses

import numpy as np

from tfsubspace.models.stats import layer_macs
from tfsubspace.prune.analysis import ChannelAnalysis
from tfsubspace.prune.plan import PruningPlan


@dataclasses.dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    latency_ms: float = 0.0  # 0.0 unless priced with a latency table

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.params - other.params, self.macs - other.macs, self.latency_ms - other.latency_ms)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs, self.latency_ms + other.latency_ms)


class PlanCost:
    """Parameters and MACs of `analysis.model` with a given set of kept channels, and its
    latency when given a latency table.

    `kept` is a boolean vector over the analysis's global channels (ChannelAnalysis.keep_vector).
    `latency`: a LatencyTable of `analysis.model` (tfsubspace.edge.latency); each layer call is
    then priced in milliseconds at its kept widths (a call without MACs by its output's
    elements), and a whole plan's `latency_ms` adds the table's fixed overhead. Without it,
    `latency_ms` is 0.0.
    """

    def __init__(self, analysis: ChannelAnalysis, latency=None):
        self.analysis = analysis
        self.latency = latency
        self._calls = [node for node in analysis.graph.walk() if node.inputs and node.outputs]
        self._latency_of = latency.call_pricers(self._calls) if latency is not None else [None] * len(self._calls)
        seen, self._counts_params = set(), []
        for node in self._calls:  # a shared layer's parameters count once
            self._counts_params.append(id(node.layer) not in seen)
            seen.add(id(node.layer))
        self._neighbours: dict[str, set[str]] | None = None
        self._calls_of_group: dict[str, list[int]] = {}
        everything = analysis.keep_vector({})
        for name, group in analysis.groups.items():
            mine = ~analysis.keep_vector({name: np.zeros(group.size, bool)}) & everything
            self._calls_of_group[name] = [
                i
                for i, node in enumerate(self._calls)
                if any(mine[analysis.ids[ref.key]].any() for ref in (node.inputs[0], node.outputs[0]))
            ]

    def neighbours(self, group: str) -> set[str]:
        """The groups read or written by a layer call that also reads or writes `group`."""
        if self._neighbours is None:
            of_call: dict[int, set[str]] = {}
            for name, calls in self._calls_of_group.items():
                for i in calls:
                    of_call.setdefault(i, set()).add(name)
            self._neighbours = {
                name: set().union(*(of_call[i] for i in calls)) - {name} if calls else set()
                for name, calls in self._calls_of_group.items()
            }
        return self._neighbours[group]

    def _call_cost(self, i: int, kept: np.ndarray) -> Cost:
        node = self._calls[i]
        n_in = int(kept[self.analysis.ids[node.inputs[0].key]].sum())
        n_out = int(kept[self.analysis.ids[node.outputs[0].key]].sum())
        params = self.analysis.handler_for(node.layer).count_params(node.layer, n_in, n_out)
        macs = layer_macs(node.layer, (*node.inputs[0].shape[:-1], n_in), (*node.outputs[0].shape[:-1], n_out))
        price = self._latency_of[i]
        return Cost(params if self._counts_params[i] else 0, macs, price(n_in, n_out) if price else 0.0)

    def __call__(self, kept: np.ndarray) -> Cost:
        """The cost of the model with channels `kept`, in total."""
        costs = [self._call_cost(i, kept) for i in range(len(self._calls))]
        params = sum(c.params for c in costs)
        latency_ms = 0.0 if self.latency is None else self.latency.overhead_ms + sum(c.latency_ms for c in costs)
        return Cost(params, sum(c.macs for c in costs), latency_ms)

    def change(self, before: np.ndarray, after: np.ndarray, group: str) -> Cost:
        """The cost of `after` minus that of `before`, two keep vectors that differ only in
        the channels of `group`."""
        calls = self._calls_of_group[group]
        params = macs = 0
        latency_ms = 0.0
        for i in calls:
            a, b = self._call_cost(i, after), self._call_cost(i, before)
            params += a.params - b.params
            macs += a.macs - b.macs
            latency_ms += a.latency_ms - b.latency_ms
        return Cost(params, macs, latency_ms)


def plan_cost(analysis: ChannelAnalysis, plan: PruningPlan, *, validate: bool = True, latency=None) -> Cost:
    """Parameters and MACs per image of the slim model of `plan` (and its latency in ms, given
    a latency table of the model)."""
    if validate:
        plan.validate(analysis)
    return PlanCost(analysis, latency=latency)(analysis.keep_vector(plan.masks()))


def plan_macs(analysis: ChannelAnalysis, plan: PruningPlan, *, validate: bool = True) -> int:
    """MACs per image of the slim model of `plan` (every call of a layer counts)."""
    return plan_cost(analysis, plan, validate=validate).macs
