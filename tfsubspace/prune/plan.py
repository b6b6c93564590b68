"""Pruning plans: which channels of each channel group of a model to keep.

A `PruningPlan` holds, per channel group (tfsubspace.prune.analysis), the group's size and the
increasing indices of the channels to keep. It is made from keep-masks (`from_masks`) or keeps
everything (`keep_all`), checks itself and its fit to a model (`check`, `validate`, raising
`PlanError`), and is saved beside the slim model as JSON (`save`, `load`, `to_json`,
`from_json`). tfsubspace.prune.surgery rebuilds the slim model of a plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError
from tfsubspace.prune.analysis import ChannelAnalysis

PLAN_FORMAT = "tfsubspace.pruning_plan/1"


class PlanError(TfSubspaceError, ValueError):
    """A pruning plan that is malformed or does not fit the model it is applied to."""


@dataclasses.dataclass
class PruningPlan:
    """Kept channel indices per channel group of one model.

    Saved as JSON beside the slim model, so that the slim model can be rebuilt from the
    original: {"format", "model", "fingerprint", "groups": {name: {"size", "keep"}}}.
    """

    model: str
    fingerprint: str
    groups: dict[str, dict]  # name -> {"size": int, "keep": [int, ...]}
    # The file the plan was loaded from, named by every error about it (not part of the plan).
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def _error(self, message: str) -> PlanError:
        return PlanError(f"Pruning plan {self.source}: {message}" if self.source else message)

    def check(self) -> None:
        """Raises PlanError unless every group has a positive size and distinct, increasing kept
        indices below it: the plan's own consistency, whatever model it is for. masks() and
        surgery index arrays with these, so a bad one must stop here rather than as an
        IndexError (or, for a negative index, silently count from the end)."""
        if not isinstance(self.groups, dict):
            raise self._error("'groups' must map group names to {'size', 'keep'}.")
        for name, g in self.groups.items():
            size, keep = (g.get("size"), g.get("keep")) if isinstance(g, dict) else (None, None)
            if not _is_index(size) or size < 1 or not isinstance(keep, list):
                raise self._error(f"Group {name!r} must have a positive integer 'size' and a 'keep' list.")
            problem = _keep_problem(keep, size)
            if problem:
                raise self._error(
                    f"Group {name!r}: kept indices must be distinct integers in [0, {size}), "
                    f"in increasing order; found {problem}."
                )

    @classmethod
    def keep_all(cls, analysis: ChannelAnalysis) -> PruningPlan:
        return cls(
            analysis.model.name,
            analysis.fingerprint(),
            {g.name: {"size": g.size, "keep": list(range(g.size))} for g in analysis.groups.values()},
        )

    @classmethod
    def from_masks(cls, analysis: ChannelAnalysis, masks: dict[str, np.ndarray]) -> PruningPlan:
        """A plan from boolean keep-masks (or index lists) for some groups; others keep all."""
        plan = cls.keep_all(analysis)
        for name, mask in masks.items():
            if name not in plan.groups:
                raise PlanError(
                    f"No channel group {name!r} in model {analysis.model.name!r}; groups: {', '.join(plan.groups)}."
                )
            mask, size = np.asarray(mask), plan.groups[name]["size"]
            if mask.dtype == bool and mask.shape != (size,):
                raise PlanError(f"Group {name!r}: a keep-mask of shape {mask.shape} for a group of {size} channels.")
            if mask.dtype != bool and mask.size and not np.issubdtype(mask.dtype, np.integer):
                raise PlanError(f"Group {name!r}: kept indices must be integers, not {mask.dtype}.")
            keep = np.nonzero(mask)[0] if mask.dtype == bool else np.unique(mask)
            plan.groups[name]["keep"] = [int(i) for i in keep]
        plan.check()
        return plan

    def masks(self) -> dict[str, np.ndarray]:
        self.check()
        out = {}
        for name, g in self.groups.items():
            mask = np.zeros(g["size"], dtype=bool)
            mask[g["keep"]] = True
            out[name] = mask
        return out

    def round_up(self, multiple: int, scores: dict[str, np.ndarray] | None = None) -> PruningPlan:
        """A plan whose kept counts are rounded up to a multiple (capped at the group size),
        adding back the removed channels of highest score (or lowest index)."""
        if multiple < 1:
            raise ValueError(f"multiple must be a positive integer. Received: multiple={multiple}")
        self.check()
        groups = {}
        for name, g in self.groups.items():
            keep = set(g["keep"])
            target = min(g["size"], math.ceil(len(keep) / multiple) * multiple) if keep else 0
            removed = [i for i in range(g["size"]) if i not in keep]
            if scores is not None and name in scores:
                removed.sort(key=lambda i: -float(scores[name][i]))
            keep.update(removed[: target - len(keep)])
            groups[name] = {"size": g["size"], "keep": sorted(keep)}
        return PruningPlan(self.model, self.fingerprint, groups)

    def validate(self, analysis: ChannelAnalysis) -> None:
        """Raises PlanError unless this plan fits `analysis`'s model and keeps what it must."""
        self.check()
        if self.fingerprint != analysis.fingerprint() or set(self.groups) != set(analysis.groups):
            raise self._error(
                f"This plan was made for model {self.model!r} with other channel groups than "
                f"model {analysis.model.name!r} has (fingerprint {self.fingerprint} vs "
                f"{analysis.fingerprint()}). Apply a plan to the model it was made for."
            )
        for name, group in analysis.groups.items():
            keep = self.groups[name]["keep"]
            if self.groups[name]["size"] != group.size:
                raise self._error(
                    f"Group {name!r}: expected size {group.size}, the plan says {self.groups[name]['size']}."
                )
            if not keep:
                raise self._error(
                    f"Group {name!r} would lose all {group.size} channels, which disconnects "
                    f"the model at {', '.join(group.producers)}; keep at least one."
                )
            if group.pinned and len(keep) != group.size:
                raise self._error(f"Group {name!r} cannot be pruned: pinned by {'; '.join(group.pinned)}.")
        kept = analysis.keep_vector(self.masks())
        for node in analysis.graph.walk():
            if not len(analysis.kept_positions(node.outputs[0], kept)):
                raise self._error(
                    f"The plan removes every output channel of layer {node.path!r} (its channels are "
                    f"one part of a merged group); keep at least one of them."
                )

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "model": self.model, "fingerprint": self.fingerprint, "groups": self.groups}

    @classmethod
    def from_json(cls, obj, source: str | None = None) -> PruningPlan:
        """The plan in `obj` (as to_json() makes it); `source` names it in errors."""
        where = f": {source}" if source else ""
        if not isinstance(obj, dict) or obj.get("format") != PLAN_FORMAT or not isinstance(obj.get("groups"), dict):
            raise PlanError(f"Not a tfsubspace pruning plan{where} (expected format {PLAN_FORMAT!r}).")
        if not isinstance(obj.get("model"), str) or not isinstance(obj.get("fingerprint"), str):
            raise PlanError(
                f"Pruning plan{where} lacks the 'model' and 'fingerprint' strings that tie it to "
                f"its model; make it again with PruningPlan.from_masks or keep_all."
            )
        plan = cls(obj["model"], obj["fingerprint"], obj["groups"], source)
        plan.check()
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        return fileio.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"Cannot read pruning plan {path}: {e}") from None
        return cls.from_json(obj, source=str(path))


def _is_index(i) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))


def _keep_problem(keep: list, size: int) -> str | None:
    """The first kept index that is no integer, out of range or not above the one before."""
    for n, i in enumerate(keep):
        if not _is_index(i):
            return f"{i!r} (not an integer)"
        if not 0 <= i < size:
            return f"{i} (out of range)"
        if n and i <= keep[n - 1]:
            return f"{i} after {keep[n - 1]} (not increasing)"
    return None
