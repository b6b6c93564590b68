"""The channel LASSO of the compression trainer: a scale-invariant group LASSO over every
prunable channel with a proximal step that zeroes whole channels (ChannelLasso), Network
Slimming's L1 on BN scales with the same interface (BatchNormL1), and the pruning plan a
trained LASSO leaves (lasso_plan)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfsubspace.prune import channels, ranking
from tfsubspace.prune.analysis import ChannelAnalysis
from tfsubspace.prune.index import ChannelIndex
from tfsubspace.prune.plan import PruningPlan


class ChannelLasso:
    """Scale-invariant group LASSO over the prunable channels of a model.

    For each channel of each prunable channel group, its *members* are, for every layer
    that produces it: the gamma and beta entries if a BatchNormalization directly follows
    that layer (the kernel's scale is then free, so the BN measures the channel; with beta
    in the group a zeroed channel outputs act(0), which is 0 for ReLU and the like, so that
    removing it changes nothing), else the layer's output filter (kernel slice and bias).
    The channel's norm is the L2 norm of all its members together.

    Norms are taken relative to their group's mean norm. A plain penalty on gammas fails
    in BN networks: scaling every gamma (and beta) of a layer alike leaves the next
    BatchNormalization's output unchanged, so the penalty can fall with no change to the
    function, every gamma shrinks alike, and no channel reaches zero before the BN epsilon
    breaks the network. Relative to the group's mean, only the channels' shares count.

    - `penalty()`: sum over channels of norm / (its group's root-mean-square norm): an L1/L2
      ratio, unchanged by scaling a group and smallest when few channels carry the group.
    - `proximal(threshold)`: soft-thresholds each channel's members jointly by
      threshold * (its group's mean norm), so that channels that fall behind their group
      become exact zeros. The strongest channel of each group is never thresholded, so no
      group (and no layer) dies whole and gradients keep flowing. In a group measured by BN
      parameters alone (scale-free), the group's mean norm is then restored, so its scale
      does not drift; elsewhere the scale matters to the function and the loss holds it
      (call after each optimizer step).
    - `norms()`: the channel norms per group, as numpy arrays (for pruning decisions).
    - `set_targets(masks)`: thresholds only the marked channels (BudgetTargets marks the
      ones a parameter budget would remove, so that they, and only they, reach zero).
    - A thresholded channel left under `snap` (5%) of its group's mean norm is set to zero.
      Where filters are the members (no BatchNormalization after the producers, as on a
      pre-activation residual stream), each gradient step moves a zeroed filter back by more
      than the soft threshold takes, and the channel settles near 1% of its group instead of
      at zero; the BatchNormalization that reads the stream scales it back to full size
      (measured on WRN-16-4: 4-9x the gain of the live channels), so the channel is alive
      until the cut removes it. Snapped, it is zero in every forward pass from then on.
    A channel whose activation of zero is not zero carries a constant once zeroed, which
    surgery folds into the next layer (apply_plan(..., fold_constants=True)).
    """

    def __init__(self, analysis: ChannelAnalysis, epsilon: float = 1e-12, snap: float = 0.05):
        self.analysis = analysis
        self.epsilon = epsilon
        self.snap = snap
        index = ChannelIndex(analysis)
        self.index = index
        self.group_sizes = index.group_sizes
        self.num_channels = index.num_channels
        self._group_of_channel = index.group_of_channel
        self._group_sizes = np.array(list(self.group_sizes.values()), dtype=np.float32)
        # members: (variable, channel index of each slice along its channel axis); _axes: that axis
        # (the last, but a transposed convolution's kernel is (..., out, in))
        self.members: list[tuple[keras.Variable, np.ndarray]] = []
        self._axes: list[int] = []
        scale_free = np.ones(len(self._group_sizes), dtype=bool)  # per group: measured by BNs only
        for node, bn, channel_index in index.producers():
            if bn is not None and bn.scale:
                self._add(bn.gamma, channel_index)
                if bn.center:
                    self._add(bn.beta, channel_index)
            else:
                axis = analysis.handler_for(node.layer).output_axis
                self._add(channels.kernel_of(node.layer), channel_index, axis)
                if node.layer.use_bias:
                    self._add(node.layer.bias, channel_index)
                scale_free[self._group_of_channel[channel_index]] = False
        self._scale_free = scale_free[self._group_of_channel]  # per channel
        # per channel: 1 where the proximal step applies, 0 where it does not (see set_targets)
        self.targets = keras.Variable(np.ones(self.num_channels, "float32"), trainable=False, name="lasso_targets")

    def _add(self, variable, channel_index, axis=-1):
        self.members.append((variable, channel_index))
        self._axes.append(axis)

    def set_targets(self, masks: dict[str, np.ndarray] | None) -> None:
        """Restricts the proximal step to the channels marked True per prunable group (None:
        all; groups not given, or not prunable, are left alone)."""
        if masks is None:
            self.targets.assign(np.ones(self.num_channels, "float32"))
            return
        flat = np.zeros(self.num_channels, "float32")
        for name, mask in masks.items():
            if name not in self.index.offsets:
                continue
            o = self.index.offsets[name]
            flat[o : o + self.group_sizes[name]] = np.asarray(mask, "float32")
        self.targets.assign(flat)

    def _norms(self):
        parts, segments = [], []
        for (var, index), axis in zip(self.members, self._axes):
            parts.append(ops.sum(ops.square(channels.filters(var, axis)), axis=0))
            segments.append(index)
        squared = ops.segment_sum(
            ops.concatenate(parts), ops.convert_to_tensor(np.concatenate(segments)), num_segments=self.num_channels
        )
        return ops.sqrt(squared + self.epsilon)

    def _group_mean(self, norms):
        """Each channel's group mean of `norms`."""
        groups = ops.convert_to_tensor(self._group_of_channel)
        sums = ops.segment_sum(norms, groups, num_segments=len(self._group_sizes))
        return ops.take(sums / ops.convert_to_tensor(self._group_sizes), groups)

    def _group_max(self, norms):
        """Each channel's group maximum of `norms`."""
        groups = ops.convert_to_tensor(self._group_of_channel)
        return ops.take(ops.segment_max(norms, groups, num_segments=len(self._group_sizes)), groups)

    def penalty(self):
        """Sum over channels of the channel's norm relative to its group's RMS norm."""
        norms = self._norms()
        return ops.sum(norms / ops.sqrt(self._group_mean(ops.square(norms))))

    def proximal(self, threshold) -> None:
        """Soft-thresholds every channel by threshold * its group's mean norm (in place), sets
        those left under `snap` of that mean to zero, then restores each group's mean norm
        where it is free."""
        norms = self._norms()
        mean = self._group_mean(norms)
        shrink = ops.maximum(0.0, 1.0 - threshold * self.targets * mean / ops.maximum(norms, 1e-30))
        snapped = (self.targets > 0) & (norms * shrink < self.snap * mean) & (ops.convert_to_tensor(threshold) > 0)
        shrink = ops.where(snapped, 0.0, shrink)
        shrink = ops.where(norms >= self._group_max(norms), 1.0, shrink)  # the strongest survives
        restore = mean / ops.maximum(self._group_mean(norms * shrink), 1e-30)
        factor = shrink * ops.where(ops.convert_to_tensor(self._scale_free), restore, 1.0)
        for (var, index), axis in zip(self.members, self._axes):
            scale = ops.take(factor, ops.convert_to_tensor(index))
            var.assign(var * (scale if axis == -1 else ops.expand_dims(scale, -1)))  # -2: (..., out, in)

    def norms(self) -> dict[str, np.ndarray]:
        """The current channel norms, per prunable group (exact zeros included)."""
        norms = keras.ops.convert_to_numpy(ops.sqrt(ops.maximum(ops.square(self._norms()) - self.epsilon, 0.0)))
        return self.index.split(norms)


class BatchNormL1:
    """Network Slimming's sparsity term (Liu et al., ICCV 2017): `loss = sum |gamma|` over the
    BatchNormalization layers of the prunable channels.

    The same interface as ChannelLasso (`members`, `penalty()`, `proximal()`, `norms()`), so
    StudentTrainer trains with either. Liu et al. add the penalty's subgradient to the loss
    (StudentTrainer(..., proximal=False)); `proximal(threshold)` is the plain soft-threshold
    of every gamma. `norms()` gives |gamma| per channel (the mean over the channel's BNs),
    the score Network Slimming prunes by with one global threshold.
    """

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.index = ChannelIndex(analysis)
        self.members: list[tuple[keras.Variable, np.ndarray]] = []
        for node in analysis.graph.walk():
            if isinstance(node.layer, keras.layers.BatchNormalization) and node.layer.scale:
                channel_index = self.index.of(analysis.ids[node.outputs[0].key])
                if channel_index is not None:
                    self.members.append((node.layer.gamma, channel_index))
        if not self.members:
            raise ValueError(
                f"Model {analysis.model.name!r} has no BatchNormalization on a prunable channel: "
                "Network Slimming needs BN scales to rank channels."
            )

    def penalty(self):
        return sum(ops.sum(ops.abs(var)) for var, _ in self.members)

    def proximal(self, threshold) -> None:
        for var, _ in self.members:
            var.assign(ops.sign(var) * ops.maximum(ops.abs(var) - threshold, 0.0))

    def norms(self) -> dict[str, np.ndarray]:
        total = np.zeros(self.index.num_channels)
        count = np.zeros(self.index.num_channels)
        for var, channel_index in self.members:
            np.add.at(total, channel_index, np.abs(keras.ops.convert_to_numpy(var)))
            np.add.at(count, channel_index, 1)
        return self.index.split(total / np.maximum(count, 1))


def alive(norms: dict[str, np.ndarray], zero_tolerance: float) -> dict[str, np.ndarray]:
    """Per group, the channels whose norm is over `zero_tolerance` (relative to the group's
    largest norm, when that is over 1): the ones LASSO has not zeroed."""
    return {g: n > zero_tolerance * max(1.0, float(n.max(initial=0.0))) for g, n in norms.items()}


def lasso_plan(
    analysis: ChannelAnalysis,
    *,
    zero_tolerance: float = 1e-6,
    multiple: int = 1,
    params: float | None = None,
    macs: float | None = None,
    latency_ms: float | None = None,
    latency=None,
) -> PruningPlan:
    """The pruning plan LASSO left: drop the channels whose ChannelLasso norm is (relatively)
    under `zero_tolerance`; with budgets (`params`, `macs` per image, `latency_ms` as the
    LatencyTable `latency` prices it), also the weakest by normalized norm until all are met
    (tfsubspace.prune.ranking.plan_for_budget)."""
    norms = ChannelLasso(analysis).norms()
    return ranking.plan_for_budget(
        analysis,
        norms,
        params=params,
        macs=macs,
        latency_ms=latency_ms,
        latency=latency,
        compare="normalized",
        multiple=multiple,
        keep=alive(norms, zero_tolerance),
    )
