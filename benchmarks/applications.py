"""Benchmark: channel analysis and exact surgery on every keras.applications model.

    python benchmarks/applications.py [--models=ResNet50,MobileNetV3Small] [--tflite]

For every constructor of keras.applications (listed from the installed Keras), with and
without its top, weights=None, at the smallest input it accepts (32x32, 71x71 for Xception,
75x75 for the Inception models): the channel analysis (groups, prunable and pinned, and why),
then a random plan that removes 30-60% of every prunable group, applied by apply_plan.
The weights are random and every BatchNormalization's statistics are set from the data it sees,
so that activations are of order one; the slim model is compared with the masked original
(relative to the size of the output), its parameter count with plan_params, its .keras round
trip with itself, and, with --tflite, its float32 TFLite file with itself (one per constructor:
the build with its top, which holds the body of the other). Each build runs in a process of its
own. Writes
benchmarks/results/applications.json and applications.md.

tests/test_applications.py runs the same check (`check_application`) on one model of every family.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.prune import analysis, graph, surgery
from tfsubspace.prune.plan import PruningPlan

# The smallest input side each constructor accepts (keras.applications checks it); 32 otherwise.
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def constructors() -> list[str]:
    """Every model constructor of keras.applications in the installed Keras."""
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def family(name: str) -> str:
    """The module of keras.applications that defines `name` (resnet, efficientnet_v2, ...)."""
    return getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]


def build(name: str, include_top: bool, size: int | None = None) -> keras.Model:
    size = size or MIN_SIZE.get(name, 32)
    return getattr(keras.applications, name)(weights=None, include_top=include_top, input_shape=(size, size, 3))


def inputs_for(model: keras.Model, n: int = 4, seed: int = 0) -> np.ndarray:
    """Images of 0-255 values, the range the models with preprocessing layers expect."""
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=(n, *model.input_shape[1:])).astype("float32")


def randomize(model: keras.Model, x: np.ndarray, seed: int = 0) -> keras.Model:
    """Random trainable weights (kernels scaled by their fan-in, scales around one, offsets
    around zero), then every BatchNormalization's moving statistics set near the statistics of
    its input on `x`, so that activations are of order one through any depth and no layer is an
    identity. Preprocessing constants (Normalization, Rescaling) are left as built."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        values = []
        for w in layer.weights:
            v = keras.ops.convert_to_numpy(w)
            if w.trainable:
                name = w.path.rsplit("/", 1)[-1]
                if "kernel" in name:
                    fan_in = np.prod(w.shape[:-1]) if len(w.shape) > 1 else 1
                    v = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), size=w.shape)
                elif name in ("gamma", "alpha") or name.startswith("gamma"):
                    v = rng.normal(1.0, 0.3, size=w.shape)
                else:
                    v = rng.normal(0.0, 0.3, size=w.shape)
            values.append(np.asarray(v, dtype=w.dtype))
        layer.set_weights(values)

    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return model
    g = graph.trace(model)
    values = {ref.key: keras.ops.convert_to_tensor(x) for ref in g.inputs}

    def calibrate(node, out):
        layer = node.layer
        if not isinstance(layer, keras.layers.BatchNormalization):
            return out
        a = keras.ops.convert_to_numpy(values[node.inputs[0].key])
        a = a.reshape(-1, a.shape[-1])
        mean, var = a.mean(axis=0), a.var(axis=0) + 1e-3
        layer.moving_mean.assign(mean + 0.2 * np.sqrt(var) * rng.normal(size=mean.shape))
        layer.moving_variance.assign(var * rng.uniform(0.5, 1.5, size=var.shape))
        return layer(values[node.inputs[0].key], training=False)

    graph.run(g, values, calibrate)
    return model


def random_plan(a: analysis.ChannelAnalysis, seed: int = 0) -> PruningPlan:
    """A plan that removes a random 30-60% of every prunable group, each layer keeping a channel."""
    rng = np.random.default_rng(seed)
    masks = {}
    for g in a.groups.values():
        if g.prunable:
            mask = rng.random(g.size) >= rng.uniform(0.3, 0.6)
            mask[rng.integers(g.size)] = True
            masks[g.name] = mask
    for node in a.graph.walk():  # a merged group may span several layers: keep one of each
        if not a.kept_positions(node.outputs[0], a.keep_vector(masks)).size:
            name, index = a.channel_position(int(a.ids[node.outputs[0].key][0]))
            masks[name][index] = True
    return PruningPlan.from_masks(a, masks)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def pin_reasons(a: analysis.ChannelAnalysis) -> dict[str, int]:
    """How many groups each kind of reason pins (the names of the model's layers left out)."""
    names = {repr(node.layer.name) for node in a.graph.walk()}
    counts = collections.Counter()
    for g in a.groups.values():
        counts.update({" ".join(w for w in reason.split() if w not in names) for reason in g.pinned})
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_application(
    name: str, include_top: bool, *, keras_file: bool = True, tflite: bool = True, seed: int = 0, workdir=None
) -> dict:
    """Builds, analyses and prunes one keras.applications model, checks the slim model (and its
    .keras and TFLite files, unless told not to), and returns what it measured (raises
    AssertionError where a check fails)."""
    start = time.perf_counter()
    model = build(name, include_top)
    x = inputs_for(model, seed=seed)
    randomize(model, x, seed)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    a = analysis.analyze(model)
    analysis_s = time.perf_counter() - start
    plan = random_plan(a, seed)

    start = time.perf_counter()
    # the check of apply_plan against the masked original, at any tolerance: it is made relative here
    result = surgery.apply_plan(model, plan, analysis=a, check_batch=x, tolerance=np.inf)
    surgery_s = time.perf_counter() - start
    slim = result.model
    out = keras.ops.convert_to_numpy(slim(x, training=False))
    # max |masked original| >= max |slim| - max |difference|: the relative difference is at most
    relative = result.check_diff / max(float(np.max(np.abs(out))) - result.check_diff, 1e-30)
    assert np.isfinite(out).all() and np.max(np.abs(out)) > 0, f"{name}: the slim model's output is degenerate"
    assert relative <= 1e-4, f"{name}: the slim model is {relative:.3g} (relative) from the masked model"
    original = keras.ops.convert_to_numpy(model(x, training=False))
    predicted = surgery.plan_params(a, plan)
    assert predicted == slim.count_params(), f"{name}: plan_params {predicted} != {slim.count_params()}"

    row = {
        "model": name,
        "family": family(name),
        "include_top": include_top,
        "input": list(model.input_shape[1:]),
        "params_before": int(model.count_params()),
        "params_after": int(slim.count_params()),
        "plan_params": int(predicted),
        "groups": len(a.groups),
        "prunable": sum(g.prunable for g in a.groups.values()),
        "pinned": sum(not g.prunable for g in a.groups.values()),
        "pinned_by": pin_reasons(a),
        "channels_removed": sum(g["size"] - len(g["keep"]) for g in plan.groups.values()),
        "keras_ops_nodes": sum(not isinstance(op, keras.layers.Layer) for op in model.operations),
        "build_s": round(build_s, 2),
        "analysis_s": round(analysis_s, 3),
        "surgery_s": round(surgery_s, 2),
        "max_rel_diff": relative,
        "slim_vs_original_rel": _relative(out, original),  # what the plan changes: far above max_rel_diff
    }
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if keras_file:
            path = fileio.save_model(slim, Path(tmp) / "slim.keras")
            loaded = fileio.load_model(path)
            row["keras_rel_diff"] = _relative(keras.ops.convert_to_numpy(loaded(x, training=False)), out)
            assert row["keras_rel_diff"] <= 1e-6, (
                f"{name}: the .keras file is {row['keras_rel_diff']:.3g} from the slim model"
            )
        if tflite:
            from tfsubspace.edge import convert, runtime

            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the converter lists every captured variable
                content = convert.convert(convert.with_batch_size(slim), "float32")
            row["tflite_s"] = round(time.perf_counter() - start, 2)
            row["tflite_rel_diff"] = _relative(runtime.TFLiteRunner(content)(x), out)
            assert row["tflite_rel_diff"] <= 1e-4, (
                f"{name}: the TFLite file is {row['tflite_rel_diff']:.3g} from the slim model"
            )
    return row


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def markdown(rows: list[dict], failures: list[dict], command: str, header: str) -> str:
    lines = [
        "# Channel analysis and surgery on every keras.applications model",
        "",
        f"`{command}`",
        "",
        header,
        "",
        "| model | top | input | groups (prunable / pinned) | pinned by | analysis | surgery | params before -> after "
        "(= plan_params) | max rel diff | .keras | TFLite |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pinned = "; ".join(f"{reason} ({n})" for reason, n in r["pinned_by"].items())
        same = "=" if r["plan_params"] == r["params_after"] else "!="
        lines.append(
            f"| {r['model']} | {'yes' if r['include_top'] else 'no'} | {r['input'][0]}x{r['input'][1]} | "
            f"{r['groups']} ({r['prunable']} / {r['pinned']}) | {pinned} | {r['analysis_s']:.2f} s | "
            f"{r['surgery_s']:.1f} s | {r['params_before']:,} -> {r['params_after']:,} ({same}) | "
            f"{_fmt(r['max_rel_diff'])} | {_fmt(r['keras_rel_diff']) if 'keras_rel_diff' in r else 'not run'} | "
            f"{_fmt(r['tflite_rel_diff']) if 'tflite_rel_diff' in r else 'not run'} |"
        )
    for f in failures:
        lines.append(
            f"| {f['model']} | {'yes' if f['include_top'] else 'no'} | | **failed** | {f['error']} | | | | | | |"
        )
    return "\n".join(lines) + "\n"


def _one(spec: str, tflite: bool) -> int:
    """Checks one model (NAME:0 or NAME:1 for its top) and prints its row as JSON."""
    name, top = spec.rsplit(":", 1)
    row = check_application(name, top == "1", tflite=tflite)
    print("ROW " + json.dumps(row), flush=True)
    return 0


def main(argv=None) -> int:
    import argparse
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="Comma-separated constructor names (default: all).")
    parser.add_argument(
        "--tflite",
        action="store_true",
        help="Also convert the slim model of every constructor (with its top) to TFLite.",
    )
    parser.add_argument("--results_dir", default="benchmarks/results")
    parser.add_argument("--name", default="applications", help="Base name of the result files.")
    parser.add_argument("--resume", action="store_true", help="Keep the rows of an earlier run; check the others.")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # NAME:top, in a process of its own
    args = parser.parse_args(argv)
    if args.one:
        return _one(args.one, args.tflite)
    names = [n for n in args.models.split(",") if n] or constructors()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{args.name}.json"
    rows, failures = [], []
    if args.resume and results.exists():
        rows = json.loads(results.read_text())["rows"]
    done = {(r["model"], r["include_top"]) for r in rows}
    kept = len(rows)
    started = time.perf_counter()
    for name in names:
        for include_top in (False, True):
            if (name, include_top) in done:
                continue
            # one process per model: a model too large for the memory fails alone, and no Keras state carries over
            tflite = args.tflite and include_top  # one TFLite file per constructor: the model with its top
            command = [sys.executable, __file__, f"--one={name}:{int(include_top)}"] + ["--tflite"] * tflite
            proc = subprocess.run(command, capture_output=True, text=True)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode == 0 and found:
                row = json.loads(found[-1])
                rows.append(row)
                print(
                    f"{name} top={include_top}: {row['groups']} groups ({row['prunable']} prunable), analysis "
                    f"{row['analysis_s']} s, surgery {row['surgery_s']} s, rel diff {row['max_rel_diff']:.2e}",
                    flush=True,
                )
            else:
                lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                error = lines[-1] if lines else f"the process ended with {proc.returncode} (out of memory?)"
                failures.append({"model": name, "include_top": include_top, "error": error[:300]})
                print(f"{name} top={include_top}: FAILED {error}", flush=True)
            results.write_text(json.dumps({"rows": rows, "failures": failures}, indent=1) + "\n")
    order = {name: i for i, name in enumerate(constructors())}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["include_top"]))
    command = "python benchmarks/applications.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    exact = sum(r["max_rel_diff"] <= 1e-4 for r in rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        f"Keras {keras.__version__} on {platform.machine()}, {os.cpu_count()} cores (load average at the end {load}: "
        f"other jobs shared the cores, so the times are upper bounds; this run took "
        f"{(time.perf_counter() - started) / 60:.0f} min). weights=None, random weights with BatchNormalization "
        "statistics set from the check batch (4 images of 0-255 values); a random plan removes 30-60% of every "
        "prunable group. max rel diff = max |slim - masked original| / max |masked original| on the check batch (an "
        "upper bound: divided by max |slim| - max |slim - masked|); .keras and TFLite (float32, for the build with "
        "the top): max |file - slim model| / max |slim model|. Analysis and surgery (rebuild, slicing and "
        f"apply_plan's masked-model check) are wall times. {len(rows)} of {len(rows) + len(failures)} builds "
        f"analysed and were pruned; {exact} exact within 1e-4 relative, every one with plan_params equal to the "
        "slim model's parameter count."
    )
    if kept:
        header += f" {kept} rows (and their times) come from an earlier run of this command that was stopped."
    results.write_text(json.dumps({"rows": rows, "failures": failures}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(rows, failures, command, header))
    print(header)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
