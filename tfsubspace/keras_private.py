"""Every use of Keras's private API, in one place.

Keras 3 has no public way to walk a Functional model's graph node by node, to read the nodes a
layer was called in, or to find the operation that produced a symbolic tensor. tfsubspace
needs all three to trace channels through a model; they are read here only, so that a Keras
release that renames them breaks one module, with one message.
"""

from __future__ import annotations

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
