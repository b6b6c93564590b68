"""A portable layer spec, to carry a Keras 3 model into tf_keras (for TFMOT).

TFMOT works on tf_keras models only, and a Keras 3 config does not load in tf_keras. So
`save_spec` writes the model's layer graph as plain JSON (class, the constructor arguments
both Keras versions share, which tensors each layer reads and writes) plus its weights as
an .npz of arrays (no pickles), and `build_tf_keras` rebuilds it, in a process where tf_keras
is importable, with the same weights. Only the layer types in SPEC_ARGS travel; anything
else is an UnsupportedModelError naming the layer.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError, UnsupportedModelError

SPEC_FORMAT = "tfsubspace.layer_spec/1"

# class name -> the constructor arguments that mean the same in Keras 3 and tf_keras.
_CONV = ("kernel_size", "strides", "padding", "dilation_rate", "activation", "use_bias")
SPEC_ARGS = {
    "Conv2D": ("filters", *_CONV),
    "DepthwiseConv2D": ("depth_multiplier", *_CONV),
    "SeparableConv2D": ("filters", "depth_multiplier", *_CONV),
    "Dense": ("units", "activation", "use_bias"),
    "BatchNormalization": ("axis", "momentum", "epsilon", "center", "scale"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Activation": ("activation",),
    "Softmax": ("axis",),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "GlobalAveragePooling2D": ("keepdims",),
    "GlobalMaxPooling2D": ("keepdims",),
    "ZeroPadding2D": ("padding",),
    "Flatten": (),
    "Dropout": ("rate",),
    "Add": (),
    "Concatenate": ("axis",),
    "Rescaling": ("scale", "offset"),
}


def to_spec(model) -> tuple[dict, list[list[np.ndarray]]]:
    """The spec of a Keras 3 Functional/Sequential model and each node's weights."""
    from tfsubspace.prune import graph

    g = graph.trace(model)
    nodes, weights, seen = [], [], set()
    for node in g.walk():
        layer = node.layer
        if id(layer) in seen:
            raise UnsupportedModelError(
                f"Layer {node.path!r} is called more than once (shared weights); "
                "the tf_keras rebuild supports one call per layer."
            )
        seen.add(id(layer))
        kind = type(layer).__name__
        if kind not in SPEC_ARGS:
            raise UnsupportedModelError(
                f"Layer {node.path!r} ({kind}) cannot be rebuilt in tf_keras; "
                f"supported: {', '.join(sorted(SPEC_ARGS))}."
            )
        config = layer.get_config()
        if kind == "Conv2D" and config.get("groups", 1) != 1:
            raise UnsupportedModelError(f"Layer {node.path!r}: grouped convolutions cannot be rebuilt in tf_keras.")
        args = {k: config[k] for k in SPEC_ARGS[kind] if k in config}
        if not isinstance(args.get("activation", "linear"), str):
            raise UnsupportedModelError(f"Layer {node.path!r}: only built-in activations (by name) can be rebuilt.")
        nodes.append(
            {
                "name": node.path.replace("/", "_"),
                "class": kind,
                "args": args,
                "inputs": [r.key for r in node.inputs],
                "outputs": [r.key for r in node.outputs],
            }
        )
        weights.append([np.asarray(w) for w in layer.get_weights()])
    spec = {
        "format": SPEC_FORMAT,
        "name": model.name,
        "inputs": [{"key": r.key, "shape": list(r.shape[1:]), "batch": r.shape[0]} for r in g.inputs],
        "outputs": [r.key for r in g.outputs],
        "nodes": nodes,
    }
    return spec, weights


def save_spec(model, directory: str | os.PathLike) -> Path:
    """Writes DIRECTORY/spec.json and DIRECTORY/weights.npz (atomically) and returns DIRECTORY."""
    spec, weights = to_spec(model)
    directory = Path(directory)
    fileio.write_bytes(directory / "weights.npz", _weights_npz(weights))
    fileio.write_json(directory / "spec.json", spec)
    return directory


def _weights_npz(weights: list[list[np.ndarray]]) -> bytes:
    """Each node's weights as one .npz, the j-th array of node i under "i_j"."""
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{i}_{j}": w for i, ws in enumerate(weights) for j, w in enumerate(ws)})
    return buffer.getvalue()


def _read_weights(arrays: dict, nodes: int) -> list[list[np.ndarray]]:
    weights = []
    for i in range(nodes):
        count = sum(1 for k in arrays if k.split("_")[0] == str(i))
        weights.append([arrays[f"{i}_{j}"] for j in range(count)])
    return weights


def save_tf_keras_weights(model, directory: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Writes the weights of `model`, a tf_keras model built from the spec in `directory` (and trained
    since), to `path` (.npz, atomically) in the spec's node order, for load_weights to read back."""
    spec, _ = load_spec(directory)
    return fileio.write_bytes(
        path, _weights_npz([model.get_layer(node["name"]).get_weights() for node in spec["nodes"]])
    )


def load_weights(model, path: str | os.PathLike):
    """Sets the weights of `model`, the Keras 3 model a spec was written from, to those that
    save_tf_keras_weights wrote to `path`; returns `model`."""
    from tfsubspace.prune import graph

    layers = [node.layer for node in graph.trace(model).walk()]
    try:
        with np.load(path, allow_pickle=False) as npz:
            weights = _read_weights(dict(npz), len(layers))
    except (OSError, ValueError) as e:
        raise TfSubspaceError(f"Cannot read the weights in {path}: {e}") from None
    for layer, values in zip(layers, weights):
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            raise TfSubspaceError(
                f"{path} holds weights of shapes {[v.shape for v in values]} for layer {layer.name!r}, which has "
                f"{shapes}: weights of another model."
            )
        if values:
            layer.set_weights(values)
    return model


def load_spec(directory: str | os.PathLike) -> tuple[dict, list[list[np.ndarray]]]:
    """Reads and validates a spec written by save_spec."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / "spec.json").read_text(encoding="utf-8"))
        with np.load(directory / "weights.npz", allow_pickle=False) as npz:
            arrays = dict(npz)
    except (OSError, ValueError) as e:
        raise TfSubspaceError(f"Cannot read the layer spec in {directory}: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise TfSubspaceError(f"{directory / 'spec.json'} is not a tfsubspace layer spec ({SPEC_FORMAT}).")
    for node in spec["nodes"]:
        if node.get("class") not in SPEC_ARGS:
            raise TfSubspaceError(f"{directory / 'spec.json'}: unknown layer class {node.get('class')!r}.")
    return spec, _read_weights(arrays, len(spec["nodes"]))


def build_tf_keras(directory: str | os.PathLike, *, batch_size: int | None = None):
    """The tf_keras model of a saved spec, with its weights (needs the `tfmot` extra)."""
    import tf_keras

    spec, weights = load_spec(directory)
    tensors = {}
    inputs = []
    for item in spec["inputs"]:
        tensors[item["key"]] = tf_keras.Input(shape=tuple(item["shape"]), batch_size=batch_size)
        inputs.append(tensors[item["key"]])
    layers = []
    for node in spec["nodes"]:
        layer = getattr(tf_keras.layers, node["class"])(name=node["name"], **node["args"])
        args = [tensors[k] for k in node["inputs"]]
        out = layer(args if node["class"] in ("Add", "Concatenate") else args[0])
        for key, tensor in zip(node["outputs"], out if isinstance(out, list) else [out]):
            tensors[key] = tensor
        layers.append(layer)
    model = tf_keras.Model(
        inputs,
        [tensors[k] for k in spec["outputs"]] if len(spec["outputs"]) > 1 else tensors[spec["outputs"][0]],
        name=spec["name"],
    )
    for layer, values in zip(layers, weights):
        if values:
            layer.set_weights(values)
    return model
