"""Channel groups: the sets of channels that must be kept or removed together.

`analyze(model)` walks the traced graph (tfsubspace.prune.graph) and asks each layer's handler
(tfsubspace.prune.channels) how it maps channels. Every producer (Conv, Dense, the pointwise part
of SeparableConv) starts a group; a merge (Add, Multiply, ...) ties channel i of its inputs
into one channel, and so merges their groups; the model's inputs and outputs, and channels
that reach a channel-mixing layer, are pinned (never removed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import keras
import numpy as np

from tfsubspace.prune import channels, graph


@dataclasses.dataclass
class ChannelGroup:
    """A set of channels removed together. `producers` are the layers whose outputs they are."""

    name: str
    size: int
    producers: list[str]
    pinned: list[str]

    @property
    def prunable(self) -> bool:
        return not self.pinned


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class ChannelAnalysis:
    """The channel groups of a model and the channel ids of every tensor of its graph.

    `handlers` maps layer classes to channel handlers for this analysis only (and the surgery
    and LASSO built on it), ahead of the registry of tfsubspace.prune.channels.register.
    """

    def __init__(self, model: keras.Model, handlers: dict | None = None):
        self.model = model
        self.handlers = channels.check_handlers(handlers)
        self.graph = graph.trace(model)
        self._channels = _UnionFind()
        self._producer_of_channel: list[str] = []  # global channel -> producing layer path
        self._producers: list[tuple[str, np.ndarray]] = []  # (path, ids) in creation order
        self._pins: list[tuple[np.ndarray, str]] = []
        self.ids: dict[int, np.ndarray] = {}  # tensor key -> channel ids of its last axis
        self._node: graph.Node | None = None
        self._first_call: dict[int, tuple[list[np.ndarray], np.ndarray | None]] = {}  # layer id -> (in ids, group)

        for ref in self.graph.inputs:
            self.ids[ref.key] = self._fresh("model input", ref.shape[-1])
            self._pins.append((self.ids[ref.key], "model input"))
        self._walk(self.graph)
        for ref in self.graph.outputs:
            self._pins.append((self.ids[ref.key], "model output"))
        self._finish()

    # ------------------------------------------------------------ the ChannelContext protocol

    @property
    def node(self) -> graph.Node:
        """The call whose channels are being mapped."""
        return self._node

    def new_group(self, layer, size: int) -> np.ndarray:
        first = self._first_call.get(id(layer))
        if first is not None and first[1] is not None:  # a shared layer: one group for all calls
            return first[1]
        ids = self._fresh(self._node.path, size)
        self._first_call[id(layer)] = (self._first_call.get(id(layer), ([], None))[0], ids)
        self._producers.append((self._node.path, ids))
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray, layer) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self._channels.union(x, y)

    def pin(self, ids: np.ndarray, reason: str) -> None:
        self._pins.append((ids, reason))

    # ------------------------------------------------------------ analysis

    def _fresh(self, owner: str, size) -> np.ndarray:
        if size is None:
            raise channels.UnsupportedModelError(
                f"{owner}: the channel axis has an unknown size; build the model with a known input shape."
            )
        self._producer_of_channel.extend([owner] * int(size))
        return self._channels.add(int(size))

    def _walk(self, g: graph.Graph) -> None:
        for node in g.nodes:
            in_ids = [self.ids[ref.key] for ref in node.inputs]
            if node.sub is not None:
                self._walk(node.sub)
                for out_ref, inner in zip(node.outputs, node.sub.outputs):
                    self.ids[out_ref.key] = self.ids[inner.key]
                continue
            if len(node.outputs) != 1:
                channels._fail(node.layer, f"has {len(node.outputs)} outputs; only single-output layers are supported.")
            self._node = node
            first = self._first_call.get(id(node.layer))
            if first is None:
                self._first_call[id(node.layer)] = (in_ids, None)
            else:  # a shared layer's weights serve every call: its inputs keep the same channels
                for a, b in zip(first[0], in_ids):
                    self.tie(a, b, node.layer)
            handler = self.handler_for(node.layer)
            out = handler.map_channels(node.layer, in_ids, [ref.shape for ref in node.inputs], self)
            self._node = None
            if len(out) != node.outputs[0].shape[-1]:
                channels._fail(
                    node.layer, f"its handler mapped {len(out)} channels onto an output of {node.outputs[0].shape[-1]}."
                )
            self.ids[node.outputs[0].key] = np.asarray(out, dtype=np.int64)

    def _finish(self) -> None:
        find = self._channels.find
        n = len(self._channels.parent)
        root = np.fromiter((find(c) for c in range(n)), dtype=np.int64, count=n)
        # Groups: producers joined by any shared channel; named after their first producer.
        group_of_root: dict[int, int] = {}
        producers: list[list[str]] = []
        members: list[list[int]] = []  # channel roots of each group, in first-seen order
        seen_roots: set[int] = set()
        for path, ids in self._producers:
            roots = root[ids]
            linked = {group_of_root[r] for r in roots.tolist() if r in group_of_root}
            if linked:
                g = min(linked)
                for other in sorted(linked - {g}, reverse=True):  # merge later groups into g
                    producers[g].extend(producers[other])
                    members[g].extend(members[other])
                    for r in members[other]:
                        group_of_root[r] = g
                    producers[other], members[other] = [], []
            else:
                g = len(producers)
                producers.append([])
                members.append([])
            producers[g].append(path)
            for r in roots.tolist():
                if r not in seen_roots:
                    seen_roots.add(r)
                    members[g].append(r)
                group_of_root[r] = g
        order = [g for g in range(len(producers)) if producers[g]]
        pinned: dict[int, list[str]] = {g: [] for g in order}
        input_roots = set()
        for ids, reason in self._pins:
            for r in set(root[ids].tolist()):
                g = group_of_root.get(r)
                if g is None:
                    input_roots.add(r)
                elif reason not in pinned[g]:
                    pinned[g].append(reason)

        self.groups: dict[str, ChannelGroup] = {}
        self._group_index = np.full(n, -1, dtype=np.int64)  # channel -> index into self.group_names
        self._local_index = np.full(n, -1, dtype=np.int64)  # channel -> position in its group
        self.group_names: list[str] = []
        root_to_pos: dict[int, tuple[int, int]] = {}
        for gi, g in enumerate(order):
            name = producers[g][0]
            self.groups[name] = ChannelGroup(name, len(members[g]), list(producers[g]), pinned[g])
            self.group_names.append(name)
            for local, r in enumerate(members[g]):
                root_to_pos[r] = (gi, local)
        for c in range(n):
            pos = root_to_pos.get(int(root[c]))
            if pos is not None:
                self._group_index[c], self._local_index[c] = pos

    # ------------------------------------------------------------ queries

    def keep_vector(self, keep: dict[str, np.ndarray]) -> np.ndarray:
        """Per global channel: kept or not, from per-group boolean masks (missing = all kept)."""
        kept = np.ones(len(self._group_index), dtype=bool)
        for gi, name in enumerate(self.group_names):
            mask = keep.get(name)
            if mask is None:
                continue
            sel = self._group_index == gi
            kept[sel] = np.asarray(mask, dtype=bool)[self._local_index[sel]]
        return kept

    def channel_position(self, channel: int) -> tuple[str, int] | None:
        """(group name, index in the group) of a channel id, or None for a model-input channel."""
        gi = int(self._group_index[channel])
        return None if gi < 0 else (self.group_names[gi], int(self._local_index[channel]))

    def kept_positions(self, ref: graph.TensorRef, kept: np.ndarray) -> np.ndarray:
        """Indices along `ref`'s last axis that survive, given keep_vector()'s result."""
        return np.nonzero(kept[self.ids[ref.key]])[0]

    def consumers(self) -> dict[int, list[graph.Node]]:
        """Tensor key -> the nodes that read it."""
        out: dict[int, list[graph.Node]] = {}
        for node in self.graph.walk():
            for ref in node.inputs:
                out.setdefault(ref.key, []).append(node)
        return out

    def taps(self) -> dict[str, str]:
        """Prunable group -> name of the layer whose output is the group's latent.

        From the group's first producer, follow the single reader of each output through
        per-channel layers (BatchNormalization, activations, pooling) and merges, stopping
        before noise layers (Dropout and the like) and keras.ops operations (which are no
        layers), at a fork, or at a model output. Groups produced inside nested models have no tap.
        """
        consumers = self.consumers()
        outputs = {ref.key for ref in self.graph.outputs}
        by_path = {node.path: node for node in self.graph.walk()}
        taps = {}
        for group in self.groups.values():
            node = by_path[group.producers[0]]
            if not group.prunable or "/" in node.path:
                continue
            while node.outputs[0].key not in outputs:
                readers = consumers.get(node.outputs[0].key, [])
                if (
                    len(readers) != 1
                    or "/" in readers[0].path
                    or not channels.is_layer(readers[0].layer)  # a tap is a layer's output, found by name
                    or isinstance(readers[0].layer, _NOISE_LAYERS)
                ):
                    break
                handler = self.handler_for(readers[0].layer)
                if not isinstance(handler, (channels.PassThrough, channels.Follower, channels.Merge)):
                    break
                node = readers[0]
            taps[group.name] = node.path
        return taps

    def handler_for(self, layer) -> channels.Handler:
        """The handler of `layer`: this analysis's own handlers first, then the registry."""
        return channels.handler_for(layer, self.handlers)

    def fingerprint(self) -> str:
        """A short hash of the group structure, to tell whether a plan fits this model."""
        spec = [[g.name, g.size, g.producers] for g in self.groups.values()]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def summary(self) -> str:
        lines = [f"{'group':<28} {'channels':>8}  producers / pinned"]
        for g in self.groups.values():
            extra = ", ".join(g.producers) + (f"  [pinned: {'; '.join(g.pinned)}]" if g.pinned else "")
            lines.append(f"{g.name:<28} {g.size:>8}  {extra}")
        return "\n".join(lines)


_NOISE_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


def analyze(model: keras.Model, handlers: dict | None = None) -> ChannelAnalysis:
    """The channel groups of a Functional or Sequential model (see ChannelAnalysis).

    Args:
        model: the model to analyse.
        handlers: {layer class: channels.Handler} for this call only, ahead of the global
            registry (e.g. `{MyLayer: channels.PassThrough()}`); a key may also be an
            Operation class or the keras.ops function that makes one.
    """
    return ChannelAnalysis(model, handlers)
