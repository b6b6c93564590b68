"""Subspace dimensions of the teacher's latents, from unlabeled data.

For each prunable channel group, the latent is the tensor at its tap (ChannelAnalysis.taps).
`latent_statistics` streams the data through the teacher once and accumulates each latent's
channel sums and cross-products (memory grows with the channel counts, not with the data);
`LatentStatistics.spectrum` gives the eigenvalues of the channel covariance. Two rules turn
spectra into widths:

- `choose_dimensions`: per group, the smallest k holding a share of the energy (sum of
  eigenvalues), within [min_ratio, 1] of the width and rounded up to a multiple;
- `dimensions_for_budget`: all groups at once, under a parameter and/or MAC budget. Each
  principal direction of each latent is worth what dropping it would change the teacher's
  output (`output_sensitivity`: its variance times the squared gain from that direction to the
  output, measured with random output projections of the teacher's gradient), and widths grow,
  `multiple` channels at a time, where the most output is bought per unit of budget. Energy
  alone keeps early, full-resolution layers as wide as late ones, at many times their MACs,
  and counts a direction the output ignores as much as one it depends on.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np

from tfsubspace.data.inputs import images_of
from tfsubspace.errors import TfSubspaceError
from tfsubspace.prune import cost, graph
from tfsubspace.prune.analysis import ChannelAnalysis


@dataclasses.dataclass
class LatentStatistics:
    """Streamed first and second moments of one latent's channels."""

    group: str
    tap: str
    count: int
    total: np.ndarray  # (n,) sum of x
    cross: np.ndarray  # (n, n) sum of x x^T

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        mean = self.mean
        return self.cross / max(self.count, 1) - np.outer(mean, mean)

    @property
    def channel_variance(self) -> np.ndarray:
        """Per-channel variance: the energy each channel carries on its own."""
        return np.maximum(np.diag(self.covariance), 0.0)

    def spectrum(self) -> np.ndarray:
        """Eigenvalues of the channel covariance, largest first (clipped at zero)."""
        values = np.linalg.eigvalsh(self.covariance)
        return np.clip(values[::-1], 0.0, None)


def latent_statistics(
    teacher: keras.Model,
    ds,
    analysis: ChannelAnalysis,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    on_first_batch=None,
    augment=None,
) -> dict[str, LatentStatistics]:
    """Runs `ds` (images, or (images, labels) whose labels are ignored) through `teacher`
    and accumulates each prunable group's latent statistics at its tap; `on_first_batch`,
    when given, is called with the first batch of images (to check them). `augment`: a Keras
    layer drawing a random view of each batch (tfsubspace.distill.augment), so that the
    statistics are those of the views the student will be trained on."""
    taps = analysis.taps()
    if not taps:
        raise TfSubspaceError(f"Model {teacher.name!r} has no prunable channel group with a tap.")
    probe = keras.Model(teacher.inputs, [teacher.get_layer(t).output for t in taps.values()])
    stats = {}
    for group, tap in taps.items():
        n = probe.get_layer(tap).output.shape[-1]
        stats[group] = LatentStatistics(group, tap, 0, np.zeros(n), np.zeros((n, n)))
    known = int(ds.cardinality()) if hasattr(ds, "cardinality") and int(ds.cardinality()) > 0 else None
    target = min(v for v in (max_batches, known) if v is not None) if (max_batches or known) else None
    bar = keras.utils.Progbar(target, unit_name="batch") if progress else None
    seen = 0
    for batch in ds:
        x = images_of(batch)
        if seen == 0 and on_first_batch is not None:
            on_first_batch(x)
        if augment is not None:
            x = augment(x, training=True)
        outs = probe(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for st, out in zip(stats.values(), outs):
            a = keras.ops.convert_to_numpy(out).astype(np.float64)
            a = a.reshape(-1, a.shape[-1])
            if not np.isfinite(a).all():
                raise FloatingPointError(
                    f"The teacher's latent at {st.tap!r} holds NaN or infinite values on batch {seen + 1}; "
                    "check the input data (images as finite floats, e.g. in [0, 1])."
                )
            st.count += a.shape[0]
            st.total += a.sum(axis=0)
            st.cross += a.T @ a
        seen += 1
        if bar is not None:
            bar.update(seen)
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise TfSubspaceError("The data set is empty: latent statistics need at least one batch of images.")
    return stats


def energy_dimension(spectrum: np.ndarray, energy: float) -> int:
    """The smallest k whose k largest eigenvalues hold at least `energy` of their sum."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]. Received: energy={energy}")
    total = float(np.sum(spectrum))
    if total <= 0.0:
        return 1
    cumulative = np.cumsum(spectrum) / total
    return int(np.searchsorted(cumulative, energy - 1e-12) + 1)


def choose_dimensions(
    stats: dict[str, LatentStatistics],
    *,
    energy: float | None = 0.99,
    width_ratio: float | None = None,
    min_ratio: float = 0.0,
    multiple: int = 8,
) -> dict[str, int]:
    """Subspace dimension k per group: by energy share, or a fixed ratio of the width.

    k is bounded below by ceil(min_ratio * n) and by 1, rounded up to `multiple`, and never
    exceeds the group's width n.
    """
    if (energy is None) == (width_ratio is None):
        raise ValueError("Give exactly one of energy and width_ratio.")
    if width_ratio is not None and not 0.0 < width_ratio <= 1.0:
        raise ValueError(f"width_ratio must be in (0, 1]. Received: width_ratio={width_ratio}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1]. Received: min_ratio={min_ratio}")
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer. Received: multiple={multiple}")
    dims = {}
    for group, st in stats.items():
        n = len(st.total)
        k = math.ceil(width_ratio * n) if width_ratio is not None else energy_dimension(st.spectrum(), energy)
        dims[group] = max(min(n, math.ceil(k / multiple) * multiple), narrowest(n, min_ratio, multiple))
    return dims


def narrowest(n: int, min_ratio: float, multiple: int) -> int:
    """The least width choose_dimensions gives a group of width n: ceil(min_ratio * n), at
    least 1, rounded up to `multiple`, at most n."""
    return min(n, math.ceil(max(math.ceil(min_ratio * n), 1) / multiple) * multiple)


def output_sensitivity(
    teacher: keras.Model,
    ds,
    analysis: ChannelAnalysis,
    groups,
    *,
    max_batches: int = 8,
    seed: int = 0,
    log_output: bool = False,
    augment=None,
) -> dict[str, np.ndarray]:
    """Per group (of `groups`, which have taps), the (n, n) matrix G = E[sum over positions of
    g g^T], g the gradient at the group's latent of r . y, y the teacher's output and r a
    standard normal vector drawn per image: for a change d of the latent at every position,
    E||change of y||^2 is about sum over positions of d^T G d, so a principal direction v of
    variance lambda is worth lambda v^T G v. `log_output`: y is the log of the output (a
    softmax's probabilities: their log is the logits up to a shift). `augment`: as in
    latent_statistics."""
    import tensorflow as tf

    from tfsubspace.train import onednn

    with onednn.strided_pointwise_workaround([teacher]):  # the gradients meet the fit loop's oneDNN bug
        return _output_sensitivity(tf, ds, analysis, groups, max_batches, seed, log_output, augment)


def _output_sensitivity(tf, ds, analysis, groups, max_batches, seed, log_output, augment):
    taps = analysis.taps()
    by_path = {taps[g]: g for g in groups}
    rng = np.random.default_rng(seed)
    sums = dict.fromkeys(groups)
    images = 0
    for seen, batch in enumerate(ds):
        if seen >= max_batches:
            break
        x = images_of(batch)
        if augment is not None:
            x = augment(x, training=True)
        watched = {}
        with tf.GradientTape() as tape:

            def watch(node, out):
                if node.path in by_path:
                    tape.watch(out)
                    watched[by_path[node.path]] = out
                return out

            values = {ref.key: tf.convert_to_tensor(v) for ref, v in zip(analysis.graph.inputs, [x])}
            graph.run(analysis.graph, values, watch)
            y = tf.cast(values[analysis.graph.outputs[0].key], tf.float32)
            if log_output:
                y = tf.math.log(tf.maximum(y, 1e-12))
            y = tf.reshape(y, (tf.shape(y)[0], -1))
            r = tf.constant(rng.standard_normal(y.shape).astype(np.float32))
            projected = tf.reduce_sum(r * y)
        names = list(watched)
        grads = tape.gradient(projected, [watched[g] for g in names])
        for g, grad in zip(names, grads):
            a = np.zeros(watched[g].shape, np.float64) if grad is None else grad.numpy().astype(np.float64)
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            term = np.einsum("bpi,bpj->ij", a, a)
            sums[g] = term if sums[g] is None else sums[g] + term
        images += int(x.shape[0])
    if images == 0:
        raise TfSubspaceError("The data set is empty: output sensitivity needs at least one batch of images.")
    return {g: (v if v is not None else np.zeros((1, 1))) / images for g, v in sums.items()}


def direction_values(st: LatentStatistics, sensitivity: np.ndarray | None = None) -> np.ndarray:
    """What each principal direction of a latent is worth, largest first: its variance, or with
    the output's `sensitivity` (output_sensitivity's G) its variance times v^T G v."""
    values, vectors = np.linalg.eigh(st.covariance)
    values = np.clip(values, 0.0, None)
    if sensitivity is not None:
        values = values * np.einsum("ij,ik,kj->j", vectors, sensitivity, vectors)
    return np.sort(values)[::-1]


def dimensions_for_budget(
    stats: dict[str, LatentStatistics],
    values: dict[str, np.ndarray],
    analysis: ChannelAnalysis,
    *,
    params: float | None = None,
    macs: float | None = None,
    latency_ms: float | None = None,
    latency=None,
    min_ratio: float = 0.0,
    multiple: int = 8,
) -> dict[str, int]:
    """Subspace dimension k per group of `stats` so that the model with each group's k
    channels of highest variance (the rest of the model whole) has at most `params`
    parameters, `macs` MACs per image and `latency_ms` milliseconds as `latency` (the model's
    tfsubspace.edge.latency.LatencyTable) prices it: every group starts at its narrowest width, then,
    `multiple` channels at a time, grows the group whose next directions (`values`, what each
    direction is worth, largest first) are worth most per unit of budget they use, while the
    budgets hold. When even the narrowest widths exceed a budget, they are returned as they
    are (the LASSO stage removes channels further)."""
    budgets = {"params": params, "macs": macs, "latency_ms": latency_ms}
    if all(v is None for v in budgets.values()):
        raise ValueError("dimensions_for_budget needs a parameter, MAC or latency budget.")
    if latency_ms is not None and latency is None:
        raise ValueError("A latency_ms budget needs the model's latency table (latency=).")
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer. Received: multiple={multiple}")
    pricer = cost.PlanCost(analysis, latency=latency if latency_ms is not None else None)

    def fits(c: cost.Cost) -> bool:
        return all(limit is None or getattr(c, name) <= limit for name, limit in budgets.items())

    width = {g: len(st.total) for g, st in stats.items()}
    dims = {g: narrowest(n, min_ratio, multiple) for g, n in width.items()}
    order = {g: np.argsort(-st.channel_variance, kind="stable") for g, st in stats.items()}

    def keep_vector(dims):
        masks = {}
        for g, k in dims.items():
            mask = np.zeros(width[g], bool)
            mask[order[g][:k]] = True
            masks[g] = mask
        return analysis.keep_vector(masks)

    kept = keep_vector(dims)
    spent = pricer(kept)
    if not fits(spent):
        return dims

    def price(g):  # the cost of growing g by `multiple` channels, at today's widths
        k = min(width[g], dims[g] + multiple)
        return k, pricer.change(kept, keep_vector({**dims, g: k}), g)

    def worth(g, k, change):  # output bought per unit of budget, None when it does not fit
        if not fits(spent + change):
            return None
        # a change can be negative (a width that is a faster kernel's multiple): then it comes first
        share = sum(getattr(change, name) / limit for name, limit in budgets.items() if limit)
        return float(np.sum(values[g][dims[g] : k])) / max(share, 1e-12)

    prices = {g: price(g) for g in dims if dims[g] < width[g]}
    while prices:
        offers = {g: worth(g, *p) for g, p in prices.items()}
        offers = {g: w for g, w in offers.items() if w is not None}
        if not offers:
            break
        g = max(offers, key=offers.get)
        dims[g], change = prices.pop(g)
        kept, spent = keep_vector(dims), spent + change
        # a group's price depends on the widths of the groups it shares layers with
        for h in {g, *pricer.neighbours(g)}:
            if h in dims and dims[h] < width[h]:
                prices[h] = price(h)
    return dims


def top_channels(stats: dict[str, LatentStatistics], dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Per group, the indices of the k channels of highest variance (sorted)."""
    return {g: np.sort(np.argsort(-stats[g].channel_variance, kind="stable")[: dims[g]]) for g in dims}


def plot_spectra(
    stats: dict[str, LatentStatistics], dims: dict[str, int], path: str | os.PathLike, energy: float | None = None
) -> None:
    """PNG: cumulative energy vs dimension for each group, with the chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfsubspace import fileio

    fig, ax = plt.subplots(figsize=(8, 5))
    for group, st in stats.items():
        spectrum = st.spectrum()
        total = spectrum.sum() or 1.0
        cumulative = np.cumsum(spectrum) / total
        n = len(spectrum)
        (line,) = ax.plot(np.arange(1, n + 1) / n, cumulative, label=f"{group} (k={dims[group]}/{n})")
        k = dims[group]
        ax.plot([k / n], [cumulative[k - 1]], "o", color=line.get_color())
    if energy is not None:
        ax.axhline(energy, color="gray", linestyle="--", linewidth=1, label=f"energy {energy:g}")
    ax.set_xlabel("dimension / width")
    ax.set_ylabel("share of latent energy")
    ax.set_title("Teacher latent spectra per channel group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
