"""ChannelIndex: the prunable channels of a model numbered 0..n-1, group after group, and the
layers that produce them (with the BatchNormalization that measures each, if any)."""

from __future__ import annotations

import keras
import numpy as np

from tfsubspace.prune import channels
from tfsubspace.prune.analysis import ChannelAnalysis


class ChannelIndex:
    """Numbers the prunable channels of a model 0..num_channels-1, group after group, and finds
    the layers that produce them."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.offsets: dict[str, int] = {}
        self.group_sizes: dict[str, int] = {}
        group_of_channel = []
        for g in analysis.groups.values():
            if g.prunable:
                self.offsets[g.name] = len(group_of_channel)
                self.group_sizes[g.name] = g.size
                group_of_channel += [len(self.offsets) - 1] * g.size
        self.num_channels = len(group_of_channel)
        self.group_of_channel = np.array(group_of_channel, dtype=np.int32)

    def of(self, ids: np.ndarray) -> np.ndarray | None:
        """The flat index of each channel id, or None if any is not prunable."""
        out = np.empty(len(ids), dtype=np.int32)
        for p, c in enumerate(ids.tolist()):
            pos = self.analysis.channel_position(c)
            if pos is None or pos[0] not in self.offsets:
                return None
            out[p] = self.offsets[pos[0]] + pos[1]
        return out

    def split(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Per-channel values cut into their groups."""
        return {name: values[o : o + self.group_sizes[name]] for name, o in self.offsets.items()}

    def producers(self):
        """(node, the BatchNormalization that alone reads its output or None, flat channel index)
        for every layer that produces prunable channels."""
        consumers = self.analysis.consumers()
        for node in self.analysis.graph.walk():
            if not isinstance(self.analysis.handler_for(node.layer), channels.Producer):
                continue
            channel_index = self.of(self.analysis.ids[node.outputs[0].key])
            if channel_index is not None:
                yield node, _following_batchnorm(node, consumers), channel_index


def _following_batchnorm(node, consumers):
    """The BatchNormalization that alone consumes `node`'s output, if any."""
    readers = consumers.get(node.outputs[0].key, [])
    if len(readers) == 1 and isinstance(readers[0].layer, keras.layers.BatchNormalization):
        return readers[0].layer
    return None
