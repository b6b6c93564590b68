"""Every use of Keras's private API, in one place.

Keras 3 has no public way to walk a Functional model's graph node by node, to read the nodes a
layer was called in, or to find the operation that produced a symbolic tensor; nor does it
export the classes of the operations that keras.ops functions leave in a graph, or the custom
layers of some keras.applications models. tfsubspace needs them to trace channels through a
model; they are read here only, so that a Keras release that renames them breaks one module,
with one message (or, for a class, leaves it without a handler).
"""

from __future__ import annotations

import importlib

import keras


def _private(obj, name: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"Keras {keras.__version__} has no {type(obj).__name__}.{name}, which tfsubspace reads to "
            "trace models; use a Keras version tfsubspace supports (see setup.py)."
        ) from None


def has_graph(model) -> bool:
    """Whether `model` is a graph of layers (Functional or Sequential), not a subclassed model."""
    return hasattr(model, "_nodes_by_depth")


def nodes_by_depth(model) -> dict:
    """depth -> the nodes of `model`'s own graph at that depth (inputs deepest)."""
    return _private(model, "_nodes_by_depth")


def inbound_nodes(layer) -> list:
    """Every node `layer` was called in (in any graph)."""
    return _private(layer, "_inbound_nodes")


def producer(tensor):
    """(operation, node index) that produced a symbolic tensor, or None for an input."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else (history.operation, history.node_index)


def op_class(module: str, name: str):
    """The class of a keras.ops graph operation, keras.src.ops.<module>.<name> (say "numpy",
    "Add"), or None where this Keras has none. keras.ops functions put these Operations, not
    layers, into a functional model (`x * 0.5 + 1.0` makes a Multiply and an Add)."""
    try:
        found = getattr(importlib.import_module(f"keras.src.ops.{module}"), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, keras.Operation) else None


def application_layer(module: str, name: str):
    """A layer class that a keras.applications model uses but Keras does not export (say
    "convnext", "LayerScale"), or None where this Keras has none."""
    try:
        found = getattr(importlib.import_module(f"keras.src.applications.{module}"), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, keras.layers.Layer) else None
