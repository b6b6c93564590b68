"""The call graph of a Keras 3 Functional or Sequential model, nested models included.

`trace(model)` lists every layer call in execution order, with the tensors it reads and
writes named by `TensorRef`s, so that channel analysis, surgery and verification walk one
graph the same way. A nested functional (or Sequential) model becomes a `Node` with its
own sub-graph, whose inputs and outputs stand for the tensors of the outer call.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import keras

from tfsubspace import keras_private
from tfsubspace.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A symbolic tensor of the traced graph: a unique key and its static shape."""

    key: int
    shape: tuple


@dataclasses.dataclass
class Node:
    """One call of a layer. `args`/`kwargs` hold TensorRefs where the call had tensors."""

    layer: keras.layers.Layer
    path: str
    args: tuple
    kwargs: dict
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    sub: Graph | None = None


@dataclasses.dataclass
class Graph:
    """The calls of one functional model, in an order where inputs come before use."""

    model: keras.Model
    inputs: list[TensorRef]
    outputs: list[TensorRef]
    nodes: list[Node]

    def walk(self) -> Iterator[Node]:
        """Every node, nested graphs' nodes included (a nested call yields its sub-nodes only)."""
        for node in self.nodes:
            if node.sub is not None:
                yield from node.sub.walk()
            else:
                yield node


def functional_view(model, name: str = "model") -> keras.Model:
    """The Functional model behind `model`: itself, or a Sequential's inner graph."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a keras.Model for {name}. Received: {type(model).__name__}")
    if isinstance(model, keras.Sequential):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if not inputs or not outputs:
            raise UnsupportedModelError(
                f"Sequential model {model.name!r} has no known input shape; start it with "
                "keras.Input(shape=...) so that its graph exists."
            )
        return keras.Model(inputs, outputs, name=model.name)
    if not keras_private.has_graph(model):
        raise UnsupportedModelError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model: its call() is "
            "Python code with no layer graph to analyse. Rebuild it with the Functional API "
            "(keras.Model(inputs, outputs)) or as a keras.Sequential."
        )
    return model


def trace(model: keras.Model) -> Graph:
    """Traces `model` into a Graph. Raises UnsupportedModelError for models without a graph."""
    counter = itertools.count()
    return _trace(functional_view(model), None, counter, prefix="")


def _trace(model, input_refs, counter, prefix) -> Graph:
    refs: dict[int, TensorRef] = {}

    def ref_of(tensor) -> TensorRef:
        ref = refs.get(id(tensor))
        if ref is None:
            ref = refs[id(tensor)] = TensorRef(next(counter), tuple(tensor.shape))
        return ref

    if input_refs is None:
        inputs = [ref_of(t) for t in model.inputs]
    else:  # a nested model: its inputs are the outer call's tensors
        inputs = []
        for t, outer in zip(model.inputs, input_refs):
            refs[id(t)] = outer
            inputs.append(outer)

    nodes = []
    for depth in sorted(keras_private.nodes_by_depth(model), reverse=True):
        for node in keras_private.nodes_by_depth(model)[depth]:
            if node.operation is None or node.is_input:
                continue
            if not all(id(t) in refs for t in node.input_tensors):
                continue  # a node of another graph that shares this layer
            layer = node.operation
            path = f"{prefix}{layer.name}"
            in_refs = [refs[id(t)] for t in node.input_tensors]
            args = keras.tree.map_structure(lambda x: _swap(x, refs), node.arguments.args)
            kwargs = keras.tree.map_structure(lambda x: _swap(x, refs), node.arguments.kwargs)
            out_refs = [ref_of(t) for t in node.output_tensors]
            sub = None
            if isinstance(layer, keras.Model):
                inner = functional_view(layer, name=path)
                if len(inner.inputs) != len(in_refs):
                    raise UnsupportedModelError(f"Nested model {path!r}: cannot match its inputs to its call.")
                sub = _trace(inner, in_refs, counter, prefix=f"{path}/")
                for out_ref, inner_out in zip(out_refs, sub.outputs):
                    if out_ref.shape != inner_out.shape:
                        raise UnsupportedModelError(f"Nested model {path!r}: outputs do not match its call.")
            nodes.append(Node(layer, path, args, kwargs, in_refs, out_refs, sub))
    outputs = [refs[id(t)] for t in model.outputs]
    return Graph(model, inputs, outputs, nodes)


def run(g: Graph, values: dict, fn=None) -> None:
    """Runs graph `g` eagerly, layer call by layer call: `values` maps tensor keys to values
    (the inputs' on entry; every tensor's on return), and `fn(node, out)`, when given, replaces
    each call's output (to mask it, or to watch it on a GradientTape)."""
    for node in g.nodes:
        if node.sub is not None:
            run(node.sub, values, fn)
            for outer, inner in zip(node.outputs, node.sub.outputs):
                values[outer.key] = values[inner.key]
            continue
        out = node.layer(*substitute(node.args, values), **substitute(node.kwargs, values))
        values[node.outputs[0].key] = out if fn is None else fn(node, out)


def _swap(x: Any, refs: dict) -> Any:
    if isinstance(x, keras.KerasTensor):
        return refs[id(x)]
    return x


def substitute(structure, values: dict[int, Any]):
    """`structure` with each TensorRef replaced by values[ref.key]."""
    return keras.tree.map_structure(lambda x: values[x.key] if isinstance(x, TensorRef) else x, structure)
