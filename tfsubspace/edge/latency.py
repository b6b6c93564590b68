"""Latency of a model's layer calls at any channel widths, for pricing pruning plans in
milliseconds beside their parameters and MACs.

Every call that does multiply-accumulates (convolutions of every kind, Dense) is priced as

    ms(n_in, n_out) = intercept + slope * work(up(n_in, m_in), up(n_out, m_out))

where `work` is the call's MAC count at those widths (models.stats.layer_macs, kept as the
bilinear form c_io * x * y + c_i * x + c_o * y) and `up(n, m)` rounds n up to a multiple of m:
the runtime's kernels process channels m at a time, so a width between two multiples costs
like the next one up. Where the runtime has a faster kernel for output widths that are a
multiple of a larger block (XNNPACK on AVX-512: 32 output channels cost less than 24), those
widths get a slope of their own. The multiples and the fast block are fitted per call, from
measurements.

`LatencyTable.measure(model)` builds, for every such call, single-layer Keras models at the
call's spatial size and a few (n_in, n_out) widths, converts each to a float32 .tflite (batch
1), times it with the LiteRT interpreter on this machine (the minimum over interleaved rounds,
which load on the machine can only raise) and fits intercept, slopes and multiples. The whole
model's .tflite is timed too, and so is a slim version of it (every prunable group at half its
width): what each takes beyond the sum of its calls is the rest of the model (pooling,
element-wise ops such as BatchNormalization, activations and residual Adds, the interpreter's
own cost), priced as a fixed overhead plus a cost per element of those other calls' outputs,
fitted from the two (the fixed part can be negative, since every single-layer timing holds one
invoke's fixed cost). A residual network spends much of its time in element-wise ops on wide
tensors, which shrink with the channels kept. Tables are cached as JSON,
keyed by a fingerprint of the model's layer calls and shapes and by a machine string, so that
asking again is instant.

`LatencyTable.from_op_profile(csv, model)` reads instead the CSV that LiteRT's benchmark_model
writes with --enable_op_profiling=true --op_profiling_output_mode=csv on a device: one time per
op at the model's full widths, mapped to the model's calls by order and op type; widths are
then priced in proportion to work at given multiples (a single profile shows no width
dependence), and the other ops' time in proportion to the elements of their outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError, UnsupportedModelError

TABLE_FORMAT = "tfsubspace.latency/2"
MULTIPLES = (1, 2, 4, 8, 16, 32)
PROBES = (8, 9, 16, 17, 32)
# A larger multiple must fit the measurements better than a smaller one by this factor, and by
# more than timing noise (RMS relative error), to be chosen: noise alone should not round widths up.
_SIMPLER_WINS = 1.25
_NOISE = 0.02


class LatencyTableError(TfSubspaceError, ValueError):
    """A latency table (cached, or read from a profile) that does not fit the model asked about."""


@dataclasses.dataclass(frozen=True)
class CallLatency:
    """The fitted latency of one layer call. `work` coefficients: MACs = c_io*x*y + c_i*x + c_o*y
    at input width x and output width y. Output widths that are a multiple of `fast_multiple`
    (0: none) cost `fast_slope_ms` per unit of work instead of `slope_ms`. `points` are the
    measurements (n_in, n_out, ms)."""

    key: str
    kind: str
    width_in: int
    width_out: int
    work: tuple[float, float, float]
    intercept_ms: float
    slope_ms: float
    multiple_in: int
    multiple_out: int
    fast_multiple: int = 0
    fast_slope_ms: float = 0.0
    points: tuple[tuple[int, int, float], ...] = ()

    def ms(self, n_in: int, n_out: int) -> float:
        """Predicted latency (ms) of this call with n_in input and n_out output channels."""
        x = _work(self.work, n_in, n_out, self.multiple_in, self.multiple_out)
        fast = self.fast_multiple and n_out % self.fast_multiple == 0
        return self.intercept_ms + (self.fast_slope_ms if fast else self.slope_ms) * x

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "work": list(self.work), "points": [list(p) for p in self.points]}

    @staticmethod
    def from_json(obj: dict) -> CallLatency:
        return CallLatency(
            key=str(obj["key"]),
            kind=str(obj["kind"]),
            width_in=int(obj["width_in"]),
            width_out=int(obj["width_out"]),
            work=tuple(float(c) for c in obj["work"]),
            intercept_ms=float(obj["intercept_ms"]),
            slope_ms=float(obj["slope_ms"]),
            multiple_in=int(obj["multiple_in"]),
            multiple_out=int(obj["multiple_out"]),
            fast_multiple=int(obj.get("fast_multiple", 0)),
            fast_slope_ms=float(obj.get("fast_slope_ms", 0.0)),
            points=tuple((int(a), int(b), float(t)) for a, b, t in obj.get("points", [])),
        )


def _up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def _work(coefficients, n_in, n_out, m_in, m_out) -> float:
    c_io, c_i, c_o = coefficients
    x, y = _up(n_in, m_in), _up(n_out, m_out)
    return c_io * x * y + c_i * x + c_o * y


@dataclasses.dataclass(frozen=True)
class Fit:
    """What fit_call found: the model's coefficients and multiples, and its RMS relative error."""

    intercept_ms: float
    slope_ms: float
    multiple_in: int
    multiple_out: int
    fast_multiple: int
    fast_slope_ms: float
    error: float


def fit_call(points: Sequence[tuple[int, int, float]], work: tuple[float, float, float], multiples=MULTIPLES) -> Fit:
    """Fits the latency model of one call to measurements (n_in, n_out, ms): non-negative least
    squares on relative error for every pair of multiples (m_in, m_out), without and with a
    faster class of output widths (multiples of 2*m_out or 4*m_out, with a slope of their own;
    tried only where measurements fall on both sides of it). The best fit wins unless a simpler
    one (no fast class, then smaller multiples) fits about as well: within a factor
    _SIMPLER_WINS, or _NOISE."""
    if not points:
        raise ValueError("fit_call needs at least one measurement.")
    t = np.array([p[2] for p in points], float)
    n_out = np.array([p[1] for p in points])
    weight = 1.0 / np.maximum(t, 1e-9)
    fits = []
    for m_in in multiples:
        for m_out in multiples:
            x = np.array([_work(work, a, b, m_in, m_out) for a, b, _ in points], float)
            for fast in (0, 2 * m_out, 4 * m_out):
                aligned = (n_out % fast == 0) if fast else np.zeros(len(t), bool)
                if fast and (aligned.all() or not aligned.any()):
                    continue
                columns = [np.ones_like(x), np.where(aligned, 0.0, x), np.where(aligned, x, 0.0)]
                coef, error = _nonnegative_fit(columns if fast else columns[:2], t, weight)
                a, b, c = (*coef, 0.0) if not fast else coef
                fits.append(((fast > 0, max(m_in, m_out), m_in + m_out, fast), Fit(a, b, m_in, m_out, fast, c, error)))
    best = min(f.error for _, f in fits)
    good_enough = [(rank, f.error, i) for i, (rank, f) in enumerate(fits) if f.error <= best * _SIMPLER_WINS + _NOISE]
    return fits[min(good_enough)[2]][1]


def _nonnegative_fit(columns, t, weight):
    """Coefficients >= 0 of `columns` minimizing the weighted squared error to t (every subset
    of columns solved by least squares; few columns, so this is exact and cheap), and the RMS
    weighted error. Of equally good solutions the first found is kept: with one measurement,
    the line through zero."""
    design = np.stack(columns, axis=1) * weight[:, None]
    target = t * weight
    best = (np.zeros(len(columns)), float(np.sqrt(np.mean(target**2))))
    for subset in itertools.product((False, True), repeat=len(columns)):
        keep = np.array(subset)
        if not keep.any():
            continue
        sub = design[:, keep]
        coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
        if np.any(coef < 0):
            continue
        error = float(np.sqrt(np.mean((sub @ coef - target) ** 2)))
        if error < best[1] - 1e-15:
            full = np.zeros(len(columns))
            full[keep] = coef
            best = (full, error)
    return [float(c) for c in best[0]], best[1]


# ---------------------------------------------------------------------------------------------
# The calls of a model


def _priced(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.Dense) or hasattr(layer, "kernel_size")


def call_keys(nodes: Iterable) -> list[tuple[object, str]]:
    """(node, key) for the calls among `nodes` that do MACs, in order: the key is the layer's
    path, with "#k" added for its k-th later call (a shared layer)."""
    seen: dict[str, int] = {}
    out = []
    for node in nodes:
        if not (node.inputs and node.outputs) or not _priced(node.layer):
            continue
        k = seen.get(node.path, 0)
        seen[node.path] = k + 1
        out.append((node, node.path if k == 0 else f"{node.path}#{k}"))
    return out


def _element_calls(nodes: Iterable) -> list:
    """The calls among `nodes` that `call_keys` does not price (no MACs): their cost goes with
    the elements of their outputs."""
    return [n for n in nodes if n.inputs and n.outputs and not _priced(n.layer)]


def _spatial(node) -> int:
    """Elements per output channel of a call (the product of its output's inner dimensions)."""
    return int(np.prod([int(d) for d in node.outputs[0].shape[1:-1]], dtype=np.int64))


def element_count(model) -> int:
    """The output elements (batch 1) of `model`'s calls that do no MACs."""
    from tfsubspace.prune.graph import trace

    return sum(_spatial(n) * int(n.outputs[0].shape[-1]) for n in _element_calls(trace(model).walk()))


def _half_width(model):
    """`model` with every prunable channel group at half its width (None where it cannot be
    analysed): a second point for the element-wise cost."""
    from tfsubspace.prune import analysis, surgery
    from tfsubspace.prune.plan import PruningPlan

    try:
        an = analysis.analyze(model)
        masks = {g: np.arange(grp.size) < max(1, grp.size // 2) for g, grp in an.groups.items() if grp.prunable}
        if not masks:
            return None
        return surgery.apply_plan(model, PruningPlan.from_masks(an, masks), analysis=an, verify=False).model
    except TfSubspaceError:
        return None


def _work_coefficients(layer, in_shape, out_shape) -> tuple[float, float, float]:
    """c_io, c_i, c_o with layer_macs(n_in, n_out) = c_io*n_in*n_out + c_i*n_in + c_o*n_out."""
    from tfsubspace.models.stats import layer_macs

    g = int(getattr(layer, "groups", 1) or 1)  # grouped convolutions: widths come in multiples of g

    def macs(n_in, n_out):
        return layer_macs(layer, (*in_shape[:-1], n_in), (*out_shape[:-1], n_out))

    c_i, c_o = macs(g, 0) / g, macs(0, g) / g
    return (macs(g, g) - g * c_i - g * c_o) / (g * g), c_i, c_o


_CONFIG_KEYS = (
    "kernel_size",
    "strides",
    "padding",
    "dilation_rate",
    "groups",
    "depth_multiplier",
    "activation",
    "use_bias",
    "data_format",
    "output_padding",
)


def _describe(node, key) -> dict:
    config = node.layer.get_config()
    return {
        "key": key,
        "class": type(node.layer).__name__,
        "in": list(node.inputs[0].shape[1:]),
        "out": list(node.outputs[0].shape[1:]),
        "config": {k: config[k] for k in _CONFIG_KEYS if k in config},
    }


def fingerprint(model) -> str:
    """A hash of `model`'s layer calls: the class, input and output shapes of every call, and
    the settings that change the speed of those that do MACs."""
    from tfsubspace.prune.graph import trace

    nodes = list(trace(model).walk())
    keyed = {id(node): key for node, key in call_keys(nodes)}
    rows = [
        _describe(node, keyed[id(node)])
        if id(node) in keyed
        else [node.path, type(node.layer).__name__, [list(r.shape[1:]) for r in node.inputs + node.outputs]]
        for node in nodes
    ]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine() -> str:
    """The machine a measured table belongs to: architecture, CPU model, TensorFlow and LiteRT."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown CPU"
    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:
        tf_version = "none"
    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # not installed as a distribution
        litert = "unknown"
    return f"{platform.machine()}, {cpu}, TensorFlow {tf_version}, LiteRT {litert}"


def default_cache_dir() -> Path:
    """`$TFSUBSPACE_LATENCY_DIR`, else `~/.cache/tfsubspace/latency`."""
    env = os.environ.get("TFSUBSPACE_LATENCY_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tfsubspace" / "latency"


# ---------------------------------------------------------------------------------------------
# Measuring


def _single_layer(layer, in_shape, n_in: int, n_out: int):
    """A one-layer Keras model of `layer`'s kind and settings, batch 1, at the spatial size of
    `in_shape`, reading n_in channels and writing n_out."""
    import keras

    config = dict(layer.get_config())
    config["name"] = f"{layer.name}_{n_in}x{n_out}"
    config["dtype"] = "float32"
    if isinstance(layer, keras.layers.Dense):
        config["units"] = n_out
    elif "depth_multiplier" in config and "filters" not in config:  # depthwise: n_out follows n_in
        pass
    elif "filters" in config:
        config["filters"] = n_out
    else:
        raise UnsupportedModelError(
            f"Layer {layer.name!r} ({type(layer).__name__}): cannot build a model of it at other "
            "widths (no 'filters' or 'units' setting) to measure its latency."
        )
    inputs = keras.Input(batch_shape=(1, *in_shape[1:-1], n_in))
    try:
        outputs = type(layer).from_config(config)(inputs)
    except Exception as e:
        raise UnsupportedModelError(
            f"Layer {layer.name!r} ({type(layer).__name__}): cannot rebuild it with {n_in} input and "
            f"{n_out} output channels to measure its latency: {e}"
        ) from None
    return keras.Model(inputs, outputs, name=f"latency_{layer.name}")


def _widths(layer, n_in: int, n_out: int, probes: Sequence[int]) -> list[tuple[int, int]]:
    """The (n_in, n_out) widths a call is measured at: full width, then each probe width below
    it on one side with the other side full (depthwise calls: both sides together)."""
    config = layer.get_config()
    if "depth_multiplier" in config and "filters" not in config:
        dm = int(config["depth_multiplier"])
        return [(w, w * dm) for w in sorted({n_in, *(p for p in probes if p < n_in)})]
    g = int(config.get("groups", 1) or 1)
    points = [(n_in, n_out)]
    points += [(n_in, w) for w in probes if w < n_out and w % g == 0]
    points += [(w, n_out) for w in probes if w < n_in and w % g == 0]
    return list(dict.fromkeys(points))


def _time_ms(runner, runs: int) -> float:
    """The fastest of `runs` invokes (ms)."""
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        runner.invoke()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure_files(
    files: Sequence, *, threads: int = 1, warmup: int = 10, rounds: int = 5, runs: int = 50
) -> list[float]:
    """The minimum invoke latency (ms) of each .tflite in `files` (paths or contents), timed in
    interleaved rounds of `runs` invokes so that a burst of load on the machine falls on all of
    them alike: a ratio of two is a speed-up measured under the same load."""
    from tfsubspace.edge.runtime import TFLiteRunner

    runners = []
    for file in files:
        runner = TFLiteRunner(file, threads=threads)
        detail = runner.input
        runner.interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
        for _ in range(warmup):
            runner.invoke()
        runners.append(runner)
    best = [math.inf] * len(runners)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            best[i] = min(best[i], _time_ms(runner, runs))
    return best


def measure_models(models: Sequence, *, threads: int = 1, warmup: int = 10, rounds: int = 5, runs: int = 50) -> list:
    """The latency (ms) of each Keras model's float32 .tflite (batch 1) here: the fastest invoke,
    the files timed side by side in interleaved rounds, as the table's own timings are, so that
    a ratio of two is a speed-up measured under the same load."""
    contents = [float32_tflite(model) for model in models]
    return measure_files(contents, threads=threads, warmup=warmup, rounds=rounds, runs=runs)


def float32_tflite(model) -> bytes:
    """The float32 .tflite (batch 1) of a Keras model that measure_models times, for measure_files."""
    from tfsubspace.edge.convert import convert, with_batch_size

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints every file it saves
        return convert(with_batch_size(model, 1), "float32")


# ---------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class LatencyTable:
    """Per-call latency models of one model on one machine (or device profile), plus the rest
    of the model: a fixed `overhead_ms` and `element_ms` per output element of the calls without
    MACs (`elements` of them at full width). `calls` are in call order, keyed as `call_keys`
    keys them."""

    model: str
    fingerprint: str
    machine: str
    source: str
    calls: dict[str, CallLatency]
    overhead_ms: float
    model_ms: float | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    element_ms: float = 0.0
    elements: int = 0

    # -- pricing

    def multiples(self) -> dict[str, tuple[int, int]]:
        """The fitted (input, output) width multiple of every call."""
        return {k: (c.multiple_in, c.multiple_out) for k, c in self.calls.items()}

    def step(self) -> int:
        """The output-width step of the kernels that take most of the model's time: the largest
        fitted output multiple whose calls (with it or a larger one) hold at least half of the
        calls' time at full width. A call of a few microseconds (a small Dense head) fits a
        multiple from noise; the step that a plan's widths are rounded to follows the time."""
        time = {}
        for call in self.calls.values():
            ms = max(call.ms(call.width_in, call.width_out), 0.0)
            time[call.multiple_out] = time.get(call.multiple_out, 0.0) + ms
        total, held = sum(time.values()), 0.0
        for multiple in sorted(time, reverse=True):
            held += time[multiple]
            if held >= total / 2:
                return multiple
        return 1  # no call takes any time

    def call_ms(self, key: str, n_in: int, n_out: int) -> float:
        """Predicted latency (ms) of call `key` at widths n_in -> n_out."""
        if key not in self.calls:
            raise LatencyTableError(f"The latency table of {self.model!r} has no layer call {key!r}.")
        return self.calls[key].ms(n_in, n_out)

    def estimate(self, widths: dict[str, tuple[int, int]] | None = None, elements: int | None = None) -> float:
        """Predicted latency (ms) of the model with the given (n_in, n_out) per call key (calls
        not named keep their full widths) and `elements` output elements of its calls without
        MACs (None: as at full width): the fixed overhead, the element-wise cost and every
        call's latency."""
        widths = dict(widths or {})
        unknown = set(widths) - set(self.calls)
        if unknown:
            raise LatencyTableError(
                f"The latency table of {self.model!r} has no layer call(s) {sorted(unknown)}; "
                f"its calls are {list(self.calls)}."
            )
        total = self.overhead_ms + self.element_ms * (self.elements if elements is None else elements)
        for key, call in self.calls.items():
            total += call.ms(*widths.get(key, (call.width_in, call.width_out)))
        return total

    def widths_of(self, model) -> dict[str, tuple[int, int]]:
        """The (n_in, n_out) of every call of `model`, a slim version of the table's model (same
        layer names and spatial sizes, fewer channels)."""
        from tfsubspace.prune.graph import trace

        widths = {}
        for node, key in call_keys(trace(model).walk()):
            if key not in self.calls:
                raise LatencyTableError(
                    f"Layer call {key!r} of model {model.name!r} is not in the latency table of {self.model!r}."
                )
            widths[key] = (int(node.inputs[0].shape[-1]), int(node.outputs[0].shape[-1]))
        missing = set(self.calls) - set(widths)
        if missing:
            raise LatencyTableError(
                f"Model {model.name!r} lacks the layer call(s) {sorted(missing)} of the latency table of "
                f"{self.model!r}; price only slim versions of the model the table was made for."
            )
        return widths

    def estimate_model(self, model) -> float:
        """Predicted latency (ms) of `model`, a slim version of the table's model."""
        return self.estimate(self.widths_of(model), element_count(model))

    def call_pricers(self, nodes: Sequence) -> list[Callable[[int, int], float] | None]:
        """For each of `nodes` (layer calls of the table's model, as prune.graph traces them),
        the function (n_in, n_out) -> ms of its call (for a call without MACs: element_ms per
        element of its output), or None for a node that is not a call."""
        keyed = {id(node): key for node, key in call_keys(nodes)}
        element_calls = {id(n) for n in _element_calls(nodes)}
        out = []
        for node in nodes:
            key = keyed.get(id(node))
            if key is None:
                per_channel = self.element_ms * _spatial(node) if id(node) in element_calls else 0.0
                out.append((lambda n_in, n_out, c=per_channel: c * n_out) if per_channel else None)
                continue
            if key not in self.calls:
                raise LatencyTableError(
                    f"Layer call {key!r} ({type(node.layer).__name__}) is not in the latency table of "
                    f"{self.model!r}: the table was made for another model."
                )
            out.append(self.calls[key].ms)
        return out

    # -- files

    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "machine": self.machine,
            "source": self.source,
            "overhead_ms": self.overhead_ms,
            "element_ms": self.element_ms,
            "elements": self.elements,
            "model_ms": self.model_ms,
            "settings": self.settings,
            "calls": [c.to_json() for c in self.calls.values()],
        }

    @staticmethod
    def from_json(obj: dict, where: str = "") -> LatencyTable:
        if not isinstance(obj, dict) or obj.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"Latency table{where} is not in format {TABLE_FORMAT!r}.")
        try:
            calls = [CallLatency.from_json(c) for c in obj["calls"]]
            return LatencyTable(
                model=str(obj["model"]),
                fingerprint=str(obj["fingerprint"]),
                machine=str(obj["machine"]),
                source=str(obj["source"]),
                calls={c.key: c for c in calls},
                overhead_ms=float(obj["overhead_ms"]),
                model_ms=None if obj.get("model_ms") is None else float(obj["model_ms"]),
                settings=dict(obj.get("settings") or {}),
                element_ms=float(obj["element_ms"]),
                elements=int(obj["elements"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LatencyTableError(f"Latency table{where} is damaged: {type(e).__name__}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        return fileio.write_json(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike) -> LatencyTable:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LatencyTableError(f"Latency table {path} is not valid JSON: {e}") from None
        return LatencyTable.from_json(obj, where=f" {path}")

    # -- making tables

    @classmethod
    def measure(
        cls,
        model,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache: bool = True,
        refresh: bool = False,
        probes: Sequence[int] = PROBES,
        threads: int = 1,
        warmup: int = 10,
        rounds: int = 5,
        runs: int = 50,
        progress: bool = False,
    ) -> LatencyTable:
        """The latency table of `model` on this machine, from the cache when it holds one for
        this model, machine and settings, else measured (and cached unless `cache` is False).

        Args:
            probes: widths each call is also measured at, below its full width on one side
                (the other side full); just above and at a multiple, so the fit can tell the
                multiples apart.
            threads, warmup, rounds, runs: LiteRT threads; untimed invokes per file; interleaved
                rounds over all files, `runs` invokes each; a file's latency is its fastest.
        """
        if threads < 1 or warmup < 0 or rounds < 1 or runs < 1:
            raise ValueError(
                f"Need threads >= 1, warmup >= 0, rounds >= 1, runs >= 1. Received: {threads}, {warmup}, "
                f"{rounds}, {runs}"
            )
        probes = tuple(sorted({int(p) for p in probes}))
        if any(p < 1 for p in probes):
            raise ValueError(f"Probe widths must be positive. Received: probes={probes}")
        settings = {"probes": list(probes), "threads": threads, "warmup": warmup, "rounds": rounds, "runs": runs}
        print_ = print if progress else lambda *a, **k: None
        fp, where = fingerprint(model), machine()
        path = cls.cache_path(model, fp, where, settings, cache_dir)
        if cache and not refresh and path.is_file():
            table = cls.load(path)
            if table.fingerprint == fp and table.machine == where and table.settings == settings:
                return table
        table = cls._measure(model, fp, where, settings, print_)
        if cache:
            table.save(path)
        return table

    @staticmethod
    def cache_path(model, fp: str, where: str, settings: dict, cache_dir=None) -> Path:
        """Where the table of `model` (fingerprint `fp`) measured on `where` with `settings` is cached."""
        key = hashlib.sha256(json.dumps([TABLE_FORMAT, fp, where, settings], sort_keys=True).encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)
        return Path(cache_dir or default_cache_dir()) / f"{name}-{key}.json"

    @classmethod
    def _measure(cls, model, fp, where, settings, print_) -> LatencyTable:
        from tfsubspace.edge.convert import convert, with_batch_size
        from tfsubspace.prune.graph import trace

        calls = call_keys(trace(model).walk())
        if not calls:
            raise UnsupportedModelError(f"Model {model.name!r} has no convolution or Dense layer to time.")
        plans, contents = [], []
        for node, key in calls:
            in_shape, out_shape = node.inputs[0].shape, node.outputs[0].shape
            if any(d is None for d in (*in_shape[1:], *out_shape[1:])):
                raise UnsupportedModelError(
                    f"Layer call {key!r} has an unknown input or output size {in_shape} -> {out_shape}; build "
                    "the model with a fully known input shape to measure its latency."
                )
            widths = _widths(node.layer, int(in_shape[-1]), int(out_shape[-1]), settings["probes"])
            print_(f"latency: converting {key} at {len(widths)} widths", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints every file it saves
                for n_in, n_out in widths:
                    contents.append(convert(_single_layer(node.layer, in_shape, n_in, n_out), "float32"))
            plans.append((node, key, widths))
        half = _half_width(model)
        wholes = [model] + ([half] if half is not None else [])
        with contextlib.redirect_stdout(io.StringIO()):
            contents += [convert(with_batch_size(m, 1), "float32") for m in wholes]
        print_(f"latency: timing {len(contents)} files", flush=True)
        times = measure_files(
            contents,
            threads=settings["threads"],
            warmup=settings["warmup"],
            rounds=settings["rounds"],
            runs=settings["runs"],
        )
        fitted, i = {}, 0
        for node, key, widths in plans:
            points = tuple((a, b, times[i + j]) for j, (a, b) in enumerate(widths))
            i += len(widths)
            work = _work_coefficients(node.layer, node.inputs[0].shape, node.outputs[0].shape)
            fit = fit_call(points, work)
            fitted[key] = CallLatency(
                key,
                type(node.layer).__name__,
                widths[0][0],
                widths[0][1],
                work,
                fit.intercept_ms,
                fit.slope_ms,
                fit.multiple_in,
                fit.multiple_out,
                fit.fast_multiple,
                fit.fast_slope_ms,
                points,
            )
        table = cls(model.name, fp, where, "measured", fitted, 0.0, times[i], settings, 0.0, element_count(model))
        # the rest of each whole model, its time beyond its calls': fixed + element_ms * elements,
        # through the full model's point. The fixed part is at least what the single-layer
        # timings counted too often: every one but one holds an invoke's fixed cost (its intercept).
        rest = [t - table.estimate(table.widths_of(m), 0) for t, m in zip(times[i:], wholes)]
        intercepts = [c.intercept_ms for c in fitted.values()]
        lowest = min(intercepts) - sum(intercepts)
        half_elements = element_count(half) if half is not None else table.elements
        if table.elements > half_elements:
            table.element_ms = max(0.0, (rest[0] - rest[1]) / (table.elements - half_elements))
        if table.elements and rest[0] - table.element_ms * table.elements < lowest:
            table.element_ms = (rest[0] - lowest) / table.elements
        table.overhead_ms = rest[0] - table.element_ms * table.elements
        return table

    @classmethod
    def from_op_profile(
        cls, csv_path: str | os.PathLike, model, *, multiple_in: int = 1, multiple_out: int = 8
    ) -> LatencyTable:
        """The latency table of `model` from LiteRT benchmark_model's op profile of its .tflite on
        a device (--enable_op_profiling=true --op_profiling_output_mode=csv
        --op_profiling_output_file=PATH): the "Run Order" table of "Operator-wise Profiling Info
        for Regular Benchmark Runs". Ops are matched to the model's calls in order by type
        (convolution, depthwise convolution, fully connected, transposed convolution; a
        separable convolution is a depthwise one then a convolution); the other ops' time is
        the fixed overhead. A profile is taken at full width only: a call's latency at other
        widths is its profiled time times its work there over its work at full width, the
        widths rounded up to `multiple_in` / `multiple_out` (the device's SIMD width: 8 for
        float32 on Arm NEON with XNNPACK)."""
        from tfsubspace.prune.graph import trace

        if multiple_in < 1 or multiple_out < 1:
            raise ValueError(f"Multiples must be positive. Received: {multiple_in}, {multiple_out}")
        path = Path(csv_path)
        rows = read_op_profile(path)
        ops = [(r, _op_kind(r["type"])) for r in rows]
        timed = [(r, kind) for r, kind in ops if kind is not None]
        calls = call_keys(trace(model).walk())
        expected = [(node, key, kind) for node, key in calls for kind in _layer_kinds(node.layer)]
        if not timed and any("delegate" in r["type"].lower() for r in rows):
            raise LatencyTableError(
                f"Op profile {path} shows delegate nodes but no convolution or fully connected op: the "
                "delegate did not report its ops. Profile without it (--use_xnnpack=false) or with a "
                "benchmark_model that reports the delegate's ops."
            )
        for i, (_, key, kind) in enumerate(expected):
            if i >= len(timed):
                raise LatencyTableError(
                    f"Op profile {path} has {len(timed)} convolution/fully connected ops but model "
                    f"{model.name!r} has {len(expected)}: none left for layer {key!r} ({kind}). Profile "
                    "the .tflite of this model."
                )
            if timed[i][1] != kind:
                raise LatencyTableError(
                    f"Op profile {path}: op {i + 1} of the convolution/fully connected ops is "
                    f"{timed[i][0]['type']!r} ({timed[i][0]['name']}) but layer {key!r} of model "
                    f"{model.name!r} needs a {kind} op there. Profile the .tflite of this model."
                )
        if len(timed) > len(expected):
            raise LatencyTableError(
                f"Op profile {path} has {len(timed)} convolution/fully connected ops but model {model.name!r} "
                f"has {len(expected)}; the profile is of another model."
            )
        ms: dict[str, float] = {}
        for (_, key, _), (row, _) in zip(expected, timed):
            ms[key] = ms.get(key, 0.0) + row["ms"]
        fitted = {}
        for node, key in calls:
            n_in, n_out = int(node.inputs[0].shape[-1]), int(node.outputs[0].shape[-1])
            work = _work_coefficients(node.layer, node.inputs[0].shape, node.outputs[0].shape)
            full = _work(work, n_in, n_out, multiple_in, multiple_out)
            fitted[key] = CallLatency(
                key,
                type(node.layer).__name__,
                n_in,
                n_out,
                work,
                0.0,
                ms[key] / full if full > 0 else 0.0,
                multiple_in,
                multiple_out,
                points=((n_in, n_out, ms[key]),),
            )
        total = sum(r["ms"] for r in rows)
        rest = total - sum(ms.values())  # the other ops: in proportion to their output elements
        elements = element_count(model)
        settings = {"profile": path.name, "multiple_in": multiple_in, "multiple_out": multiple_out}
        return cls(
            model.name,
            fingerprint(model),
            f"op profile {path.name}",
            "op_profile",
            fitted,
            0.0 if elements else rest,
            total,
            settings,
            rest / elements if elements else 0.0,
            elements,
        )


# ---------------------------------------------------------------------------------------------
# Op profiles

_REGULAR = "Operator-wise Profiling Info for Regular Benchmark Runs"


def read_op_profile(path: str | os.PathLike) -> list[dict]:
    """The rows of the "Run Order" table of a benchmark_model CSV op profile's regular runs:
    [{"type", "ms" (time per run: avg_ms times calls per run), "name"}], in run order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Op profile not found: {path}")
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if _REGULAR in line), None)
    if start is None:
        raise LatencyTableError(
            f"{path} has no {_REGULAR!r} section: write it with benchmark_model --enable_op_profiling=true "
            "--op_profiling_output_mode=csv --op_profiling_output_file=PATH."
        )
    i = start + 1
    while i < len(lines) and "Run Order" not in lines[i]:
        i += 1
    header_at = i + 1
    if header_at >= len(lines) or "node type" not in lines[header_at]:
        raise LatencyTableError(f"{path}: no 'Run Order' table with a 'node type' header after {_REGULAR!r}.")
    header = [h.strip().lower() for h in lines[header_at].split(",")]
    if len(header) < 3:
        raise LatencyTableError(
            f"{path}: the op profile is not CSV (header {lines[header_at].strip()!r}); write it with "
            "--op_profiling_output_mode=csv."
        )
    try:
        type_at, ms_at, name_at = header.index("node type"), header.index("avg_ms"), header.index("name")
    except ValueError:
        raise LatencyTableError(
            f"{path}: the op profile header {lines[header_at].strip()!r} lacks 'node type', 'avg_ms' or 'name'."
        ) from None
    calls_at = header.index("times called") if "times called" in header else None
    rows = []
    for n, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        if not line.strip() or line.startswith("="):
            break
        # The writer replaces commas in names (the last column) but not in node types, and
        # XNNPACK's types hold commas ("Convolution (NHWC, F32) IGEMM"): extra fields belong to
        # the type.
        cells = [c.strip() for c in line.split(",")]
        extra = len(cells) - len(header)
        if extra > 0 and type_at == 0 and name_at == len(header) - 1:
            cells = [", ".join(cells[: extra + 1]), *cells[extra + 1 :]]
        if len(cells) != len(header):
            raise LatencyTableError(f"{path}, line {n}: {len(cells)} fields where the header has {len(header)}.")
        try:
            per_call = float(cells[ms_at])
            times = int(float(cells[calls_at])) if calls_at is not None else 1
        except ValueError:
            raise LatencyTableError(f"{path}, line {n}: avg_ms or times called is not a number: {line!r}") from None
        rows.append({"type": cells[type_at], "ms": per_call * max(times, 1), "name": cells[name_at]})
    if not rows:
        raise LatencyTableError(f"{path}: the 'Run Order' table of {_REGULAR!r} has no rows.")
    return rows


def _op_kind(op_type: str) -> str | None:
    """The kind of MAC op a profile row is (LiteRT builtin ops and XNNPACK's), or None."""
    t = op_type.strip()
    upper = t.upper()
    if upper in ("DEPTHWISE_CONV_2D",) or (t.startswith("Convolution") and "DWConv" in t):
        return "depthwise"
    if upper in ("CONV_2D", "CONV_3D") or t.startswith("Convolution"):
        return "conv"
    if upper == "FULLY_CONNECTED" or t.startswith("Fully Connected"):
        return "dense"
    if upper in ("TRANSPOSE_CONV", "CONV_3D_TRANSPOSE") or t.startswith("Deconvolution"):
        return "transpose"
    return None


def _layer_kinds(layer) -> tuple[str, ...]:
    """The ops a layer's call becomes in a .tflite, by kind."""
    import keras

    if isinstance(layer, keras.layers.Dense):
        return ("dense",)
    names = {c.__name__ for c in type(layer).__mro__}
    if names & {"SeparableConv1D", "SeparableConv2D"}:
        return ("depthwise", "conv")
    if names & {"DepthwiseConv1D", "DepthwiseConv2D"}:
        return ("depthwise",)
    if names & {"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}:
        return ("transpose",)
    return ("conv",)
