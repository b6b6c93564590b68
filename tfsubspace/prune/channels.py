"""How each layer type maps channels: the one place that knows it.

A channel is named by an integer id; a tensor's last axis is an array of ids (an id may
appear several times: Flatten repeats each channel once per pixel, a depthwise layer once
per multiplier). Every supported layer type, and every supported keras.ops operation (the
Operations that `x * 0.5 + 1.0` or `keras.ops.mean(x, axis=-1)` leave in a functional
model), has a handler with the same jobs:

- `map_channels`: the ids of the output from the ids of the inputs (a producer starts a
  new group, a merge ties its inputs' channels together, a follower passes them on);
- `rebuild`: a new layer (or operation) for the kept input and output positions;
- `arguments`: the arguments of its call in the slim model (a per-channel constant that an
  operation is called with is cut to the kept channels);
- `slice_weights`: the layer's weights cut to the kept positions, in get_weights() order;
- `count_params`: the parameter count for given kept input and output counts.

`kernel_of(layer)` is the weight that holds a producer's output channels.

`register(layer_class, handler)` adds or replaces a handler, so a custom layer can take
part; it takes an Operation class, or the keras.ops function that makes one, all the same.
A layer or operation whose class has no handler is an error that names it.
"""

from __future__ import annotations

import math
from typing import Protocol

import keras
import numpy as np

from tfsubspace import keras_private
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.prune.graph import TensorRef

# Activations that act on each channel alone (removing one channel changes no other).
_CHANNELWISE_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "sigmoid",
        "tanh",
        "leaky_relu",
        "softplus",
        "softsign",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "mish",
        "exponential",
        "celu",
        "log_sigmoid",
        "squareplus",
        "sparse_plus",
        "tanh_shrink",
        "hard_tanh",
        "soft_shrink",
        "hard_shrink",
    }
)


class ChannelContext(Protocol):
    """What a handler may ask of the analysis while mapping channels. `node` is the call being
    mapped (a tfsubspace.prune.graph.Node: its arguments, with TensorRefs for the tensors, and
    its output shapes)."""

    node: object

    def new_group(self, layer, size: int) -> np.ndarray: ...
    def tie(self, a: np.ndarray, b: np.ndarray, layer) -> None: ...
    def pin(self, ids: np.ndarray, reason: str) -> None: ...


def is_layer(layer) -> bool:
    """Whether a graph node's callee is a layer (else it is a keras.ops Operation)."""
    return isinstance(layer, keras.layers.Layer)


def describe(layer) -> str:
    """How errors name a layer, or a keras.ops operation of a graph (which is no layer)."""
    cls = type(layer)
    if is_layer(layer):
        return f"Layer {layer.name!r} ({cls.__name__})"
    where = cls.__module__.removeprefix("keras.src.")
    return f"keras.ops operation {layer.name!r} ({where}.{cls.__name__}, not a layer)"


def _who(layer) -> str:
    """A layer or operation in a pin reason: its class and name."""
    return f"{type(layer).__name__} {layer.name!r}"


def _fail(layer, reason: str):
    raise UnsupportedModelError(f"{describe(layer)}: {reason}")


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        _fail(layer, "only channels_last data is supported.")


def _activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", str(activation))


def _with_bias(layer, kernels: list[np.ndarray], keep_out: np.ndarray) -> list[np.ndarray]:
    """`kernels` followed by the bias cut to the kept outputs, if the layer has one."""
    return kernels + ([layer.bias.numpy()[keep_out]] if layer.use_bias else [])


def _rebuilt(layer, **changes):
    config = layer.get_config()
    config.update(changes)
    return type(layer).from_config(config)


class Handler:
    """Base handler: a layer with no weights whose output carries its input's channels."""

    # Whether the slim layer computes exactly the kept channels of the masked original's output.
    # An inexact handler (opt-in pruning across a channel-mixing layer) gives `slim_output`, what
    # its slim layer computes; surgery checks the rest of the model against it and reports the gap.
    exact = True

    def slim_output(self, layer, x, passes: np.ndarray):
        """For an inexact handler: the slim layer's output at the original width (removed
        channels zero), from the masked input `x`, where `passes` marks the kept input channels."""
        raise NotImplementedError(f"{type(self).__name__} is exact: the slim layer computes the masked output.")

    def resolve(self, layer) -> Handler:
        """The handler for this very layer: itself, unless its class's layers need different
        handlers by their configuration (Convolution: plain or grouped)."""
        return self

    def map_channels(self, layer, in_ids: list[np.ndarray], in_shapes: list[tuple], ctx: ChannelContext) -> np.ndarray:
        if len(in_ids) != 1:
            _fail(layer, f"expected one input, found {len(in_ids)}.")
        return in_ids[0]

    def rebuild(self, layer, keep_in: list[np.ndarray], keep_out: np.ndarray):
        return type(layer).from_config(layer.get_config())

    def arguments(self, layer, args: tuple, kwargs: dict, keep_out: np.ndarray) -> tuple[tuple, dict]:
        """The call's arguments in the slim model (TensorRefs stand for its tensors, and are
        left as they are): the original ones, unless the handler cuts a constant."""
        return args, kwargs

    def slice_weights(self, layer, keep_in: list[np.ndarray], keep_out: np.ndarray) -> list[np.ndarray]:
        return []

    def count_params(self, layer, n_in: int, n_out: int) -> int:
        return 0

    def weights_set(self, layer) -> None:
        """Called on a rebuilt layer once its sliced weights are set (a layer that derives state
        from its weights updates it here)."""

    def fold_constants(self, layer, constants: np.ndarray, keep_in: np.ndarray):
        """Bias change (over all output channels) that stands in for removed constant inputs.

        `constants` holds, for each input position, the constant it carries, or NaN. Returns
        (delta, exact) or None where this layer type cannot fold.
        """
        return None


class PassThrough(Handler):
    """Pooling, dropout, padding, cropping, up-sampling, channel-wise activations."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        name = _activation_name(layer) if isinstance(layer, keras.layers.Activation) else "linear"
        if name not in _CHANNELWISE_ACTIVATIONS:
            ctx.pin(in_ids[0], f"activation {name!r} of layer {layer.name!r} mixes channels")
        return super().map_channels(layer, in_ids, in_shapes, ctx)


class ChannelMixing(Handler):
    """A layer whose outputs each depend on every channel (Softmax, LayerNormalization):
    its channels cannot be removed, so their group is pinned; its weights are sliced
    along the channel axis all the same (no-op, as nothing is removed)."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        ctx.pin(in_ids[0], f"{_who(layer)} mixes channels")
        return in_ids[0]

    def slice_weights(self, layer, keep_in, keep_out):
        return [w[..., keep_out] for w in layer.get_weights()]

    def count_params(self, layer, n_in, n_out):
        return sum(int(np.prod(w.shape)) for w in layer.get_weights())


def _shared(w) -> bool:
    """A weight shared by every channel: a scalar, or one entry along the channel axis (PReLU
    with its shared_axes over the channels)."""
    return np.ndim(w) == 0 or np.shape(w)[-1] == 1


class Follower(Handler):
    """Per-channel weights along the last axis (BatchNormalization, PReLU); a weight shared by
    every channel is kept whole."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        axis = getattr(layer, "axis", -1)
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        rank = len(in_shapes[0])
        if any(a not in (-1, None) and a != rank - 1 for a in axes):
            _fail(layer, f"normalizes over axis {axis}, not the channel (last) axis.")
        return super().map_channels(layer, in_ids, in_shapes, ctx)

    def slice_weights(self, layer, keep_in, keep_out):
        return [w if _shared(w) else w[..., keep_out] for w in layer.get_weights()]

    def count_params(self, layer, n_in, n_out):
        weights = layer.get_weights()
        shared = sum(int(np.size(w)) for w in weights if _shared(w))
        return shared + sum(int(np.prod(w.shape[:-1])) for w in weights if not _shared(w)) * n_out


class PrunableLayerNorm(Follower):
    """LayerNormalization over the channel axis whose channels may be removed all the same (opt
    in: `register(keras.layers.LayerNormalization, PrunableLayerNorm())`). Its statistics then
    span the kept channels only, so the slim model is no longer the masked original: surgery
    checks every other layer exactly against the slim layer's own output (slim_output), and
    reports, per such layer, how far pruning moved its output (SurgeryResult.approximations);
    distillation is what recovers the difference."""

    exact = False

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        rank = len(in_shapes[0])
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if {int(a) % rank for a in axes} != {rank - 1}:
            _fail(layer, f"normalizes over axes {layer.axis}, not the channel axis alone.")
        return in_ids[0]

    def slim_output(self, layer, x, passes):
        ops = keras.ops
        keep = ops.convert_to_tensor(passes)
        n = float(np.count_nonzero(passes))
        x = ops.cast(x, "float32")
        kept = ops.where(keep, x, ops.zeros_like(x))
        mean = ops.sum(kept, axis=-1, keepdims=True) / n
        variance = ops.sum(ops.where(keep, ops.square(x - mean), ops.zeros_like(x)), axis=-1, keepdims=True) / n
        if getattr(layer, "rms_scaling", False):  # Keras: x * rsqrt(variance + epsilon) * gamma, no centering
            y = x * ops.rsqrt(variance + layer.epsilon)
        else:
            y = (x - mean) * ops.rsqrt(variance + layer.epsilon)
        if layer.scale:
            y = y * ops.cast(layer.gamma, y.dtype)
        if layer.center and not getattr(layer, "rms_scaling", False):
            y = y + ops.cast(layer.beta, y.dtype)
        return ops.where(keep, y, ops.zeros_like(y))


class LayerScale(Follower):
    """A layer whose one weight scales each channel and whose config names the channel count
    (ConvNeXt's LayerScale: `projection_dim`)."""

    def rebuild(self, layer, keep_in, keep_out):
        return _rebuilt(layer, projection_dim=int(len(keep_out)))


class GroupNorm(Follower):
    """GroupNormalization: its statistics span each group of channels, so a group of channels
    is kept or removed whole (its channels are tied), and the slim layer has fewer groups of the
    same size; with one group it normalizes over all channels, which pins them."""

    @staticmethod
    def _split(layer) -> tuple[int, int]:
        width = int(layer.input_spec.axes[layer.axis])  # the channels the built layer normalizes
        groups = width if layer.groups == -1 else int(layer.groups)
        return groups, width // groups

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        ids = super().map_channels(layer, in_ids, in_shapes, ctx)
        groups, per_group = self._split(layer)
        if groups == 1 and len(ids) > 1:
            ctx.pin(ids, f"{_who(layer)} normalizes over all channels together (groups=1)")
        blocks = ids.reshape(groups, per_group)
        for j in range(1, per_group):
            ctx.tie(blocks[:, 0], blocks[:, j], layer)
        return ids

    def rebuild(self, layer, keep_in, keep_out):
        groups, per_group = self._split(layer)
        return _rebuilt(layer, groups=int(len(keep_out)) // per_group)


class Pinned(Handler):
    """A layer that keeps every channel it sees (its weights are whole-tensor constants, such as
    an adapted Normalization's mean, variance and count): its group is pinned, its weights kept."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        ctx.pin(in_ids[0], f"{_who(layer)} holds per-channel constants it cannot drop")
        return super().map_channels(layer, in_ids, in_shapes, ctx)

    def slice_weights(self, layer, keep_in, keep_out):
        return layer.get_weights()

    def weights_set(self, layer) -> None:
        finalize = getattr(layer, "finalize_state", None)  # Normalization: mean and variance from the weights
        if finalize is not None:
            finalize()

    def count_params(self, layer, n_in, n_out):
        return sum(int(np.size(w)) for w in layer.get_weights())


class Rescaling(PassThrough):
    """x * scale + offset: channel-wise as it is when both are scalars; per-channel values pin
    the group (they live in the config, not in weights that could be sliced)."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        if np.ndim(layer.scale) or np.ndim(layer.offset):
            ctx.pin(in_ids[0], f"Rescaling {layer.name!r} has per-channel scale or offset")
        return super().map_channels(layer, in_ids, in_shapes, ctx)


class Producer(Handler):
    """Conv1D/2D/3D and Dense: a new group of `filters`/`units` output channels."""

    size_attr = "filters"
    output_axis = -1  # the axis of kernel_of(layer) that holds the output channels

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        if getattr(layer, "groups", 1) != 1:
            _fail(layer, f"a grouped convolution (groups={layer.groups}) needs the handler channels.Convolution().")
        ids = ctx.new_group(layer, getattr(layer, self.size_attr))
        if _activation_name(layer) not in _CHANNELWISE_ACTIVATIONS:
            ctx.pin(ids, f"activation {_activation_name(layer)!r} of layer {layer.name!r} mixes channels")
        return ids

    def rebuild(self, layer, keep_in, keep_out, use_bias=None):
        changes = {self.size_attr: int(len(keep_out))}
        if use_bias is not None:
            changes["use_bias"] = use_bias
        return _rebuilt(layer, **changes)

    def slice_weights(self, layer, keep_in, keep_out):
        return _with_bias(layer, [layer.kernel.numpy()[..., keep_in[0], :][..., keep_out]], keep_out)

    def count_params(self, layer, n_in, n_out):
        kernel = math.prod(getattr(layer, "kernel_size", ()))
        return kernel * n_in * n_out + (n_out if layer.use_bias else 0)

    def fold_constants(self, layer, constants, keep_in):
        removed = np.ones(len(constants), bool)
        removed[keep_in] = False
        values = np.where(removed & ~np.isnan(constants), constants, 0.0)
        kernel = layer.kernel.numpy()  # (..., in, out)
        # A constant input c adds c * sum(kernel window) to every output position whose
        # window lies inside the input; only at the borders of 'same' padding is it less.
        delta = values @ kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)
        exact = (
            isinstance(layer, keras.layers.Dense)
            or getattr(layer, "padding", "valid") == "valid"
            or all(k == 1 for k in getattr(layer, "kernel_size", (1,)))
        )
        return delta, exact


class DenseProducer(Producer):
    size_attr = "units"


def _conv_groups(layer, width: int) -> tuple[int, int, int]:
    """(groups, input channels per group, output channels per group) of a grouped convolution."""
    groups = int(layer.groups)
    if width % groups or layer.filters % groups:
        _fail(layer, f"{width} input channels or {layer.filters} filters do not split into {groups} groups.")
    return groups, width // groups, layer.filters // groups


class GroupedConv(Handler):
    """Conv1D/2D/3D with groups > 1, pruned by whole groups: the input channels of group k and
    its output channels are one channel, kept or removed together, so that the slim layer has
    fewer groups of the same shape. In the depthwise form (one input channel per group, as in
    ConvNeXt) that is channel by channel, as for DepthwiseConv2D; with several input channels
    per group, these are tied together upstream (GroupedConvByPosition prunes the other way)."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        groups, per_in, per_out = _conv_groups(layer, len(in_ids[0]))
        blocks = in_ids[0].reshape(groups, per_in)
        for j in range(1, per_in):
            ctx.tie(blocks[:, 0], blocks[:, j], layer)
        ids = np.repeat(blocks[:, 0], per_out)
        if _activation_name(layer) not in _CHANNELWISE_ACTIVATIONS:
            ctx.pin(ids, f"activation {_activation_name(layer)!r} of layer {layer.name!r} mixes channels")
        return ids

    def rebuild(self, layer, keep_in, keep_out):
        per_out = layer.filters // layer.groups
        return _rebuilt(layer, filters=int(len(keep_out)), groups=int(len(keep_out)) // per_out)

    def slice_weights(self, layer, keep_in, keep_out):
        return _with_bias(layer, [layer.kernel.numpy()[..., keep_out]], keep_out)  # kernel: (..., in/groups, out)

    def count_params(self, layer, n_in, n_out):
        per_in = int(layer.kernel.shape[-2])
        return math.prod(layer.kernel_size) * per_in * n_out + (n_out if layer.use_bias else 0)


class GroupedConvByPosition(Producer):
    """Conv1D/2D/3D with groups > 1, pruned within its groups: input position i of every group
    is one channel (tied upstream), and output position j of every group is one channel of a
    new group, so that the slim layer keeps its number of groups, each narrower. Register it
    with `register(keras.layers.Conv2D, Convolution(grouped=GroupedConvByPosition()))`."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        groups, per_in, per_out = _conv_groups(layer, len(in_ids[0]))
        blocks = in_ids[0].reshape(groups, per_in)
        for k in range(1, groups):
            ctx.tie(blocks[0], blocks[k], layer)
        ids = ctx.new_group(layer, per_out)
        if _activation_name(layer) not in _CHANNELWISE_ACTIVATIONS:
            ctx.pin(ids, f"activation {_activation_name(layer)!r} of layer {layer.name!r} mixes channels")
        return np.tile(ids, groups)

    def slice_weights(self, layer, keep_in, keep_out):
        per_in = int(layer.kernel.shape[-2])
        local = keep_in[0][keep_in[0] < per_in]  # the same positions are kept in every group
        return _with_bias(layer, [layer.kernel.numpy()[..., local, :][..., keep_out]], keep_out)

    def count_params(self, layer, n_in, n_out):
        kernel = math.prod(layer.kernel_size)
        return kernel * (n_in // layer.groups) * n_out + (n_out if layer.use_bias else 0)

    def fold_constants(self, layer, constants, keep_in):
        removed = np.ones(len(constants), bool)
        removed[keep_in] = False
        values = np.where(removed & ~np.isnan(constants), constants, 0.0)
        kernel = layer.kernel.numpy()  # (..., in/groups, out)
        groups, per_in = int(layer.groups), int(kernel.shape[-2])
        summed = kernel.reshape(-1, per_in, groups, kernel.shape[-1] // groups).sum(axis=0)  # (in/g, g, out/g)
        delta = np.einsum("gi,igo->go", values.reshape(groups, per_in), summed).reshape(-1)
        exact = getattr(layer, "padding", "valid") == "valid" or all(k == 1 for k in layer.kernel_size)
        return delta, exact


class Convolution(Producer):
    """Conv1D/2D/3D: a producer, or with groups > 1 the handler `grouped` (GroupedConv, which
    prunes whole groups, unless another is given)."""

    def __init__(self, grouped: Handler | None = None):
        self.grouped = grouped if grouped is not None else GroupedConv()

    def resolve(self, layer) -> Handler:
        return self.grouped.resolve(layer) if getattr(layer, "groups", 1) != 1 else self


class TransposeProducer(Producer):
    """Conv2DTranspose and friends: the kernel is (..., out, in)."""

    output_axis = -2

    def slice_weights(self, layer, keep_in, keep_out):
        return _with_bias(layer, [layer.kernel.numpy()[..., keep_in[0]][..., keep_out, :]], keep_out)

    def fold_constants(self, layer, constants, keep_in):
        return None


class Depthwise(Handler):
    """DepthwiseConv1D/2D: output channel c*m + j comes from input channel c alone."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        return np.repeat(in_ids[0], layer.depth_multiplier)

    def slice_weights(self, layer, keep_in, keep_out):
        return _with_bias(layer, [layer.kernel.numpy()[..., keep_in[0], :]], keep_out)  # kernel: (..., in, mult)

    def count_params(self, layer, n_in, n_out):
        kernel = math.prod(layer.kernel_size)
        return kernel * n_in * layer.depth_multiplier + (n_out if layer.use_bias else 0)


class Separable(Producer):
    """SeparableConv1D/2D: a depthwise step tied to the input, then a pointwise producer."""

    def slice_weights(self, layer, keep_in, keep_out):
        depthwise = layer.depthwise_kernel.numpy()  # (..., in, multiplier)
        pointwise = layer.pointwise_kernel.numpy()  # (1.., in * multiplier, filters)
        m = layer.depth_multiplier
        rows = (keep_in[0][:, None] * m + np.arange(m)[None, :]).reshape(-1)
        return _with_bias(layer, [depthwise[..., keep_in[0], :], pointwise[..., rows, :][..., keep_out]], keep_out)

    def count_params(self, layer, n_in, n_out):
        kernel = math.prod(layer.kernel_size)
        m = layer.depth_multiplier
        return kernel * n_in * m + n_in * m * n_out + (n_out if layer.use_bias else 0)

    def fold_constants(self, layer, constants, keep_in):
        return None


class Flatten(Handler):
    """Flatten of (..., C): channel c sits at every position p * C + c."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        return _flatten_ids(layer, in_ids[0], in_shapes[0])


def _flatten_ids(layer, ids, shape):
    if any(d is None for d in shape[1:-1]):
        _fail(layer, "flattens a tensor of unknown spatial size; build the model with a fixed input shape.")
    return np.tile(ids, math.prod(shape[1:-1]))


class Reshape(Handler):
    """Reshape (layer or keras.ops) that keeps the channel axis last: its new last axis holds k
    whole copies of the channel axis (k = 1: the other axes were rearranged; k > 1: some of them
    folded into it, as a flatten does), so channel c sits at every position p * C + c."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        width, out = len(in_ids[0]), ctx.node.outputs[0].shape
        if len(out) < 2 or out[-1] is None:
            _fail(layer, "reshapes to an unknown channel size; build the model with a fixed input shape.")
        if out[-1] % width:
            _fail(layer, f"reshapes {tuple(in_shapes[0][1:])} to {tuple(out[1:])}, which moves the channel axis.")
        return np.tile(in_ids[0], out[-1] // width)

    def rebuild(self, layer, keep_in, keep_out):
        key = "target_shape" if is_layer(layer) else "newshape"
        target = list(layer.get_config()[key])
        if target[-1] != -1:
            target[-1] = int(len(keep_out))
        return _rebuilt(layer, **{key: tuple(target)})


def _constants(node) -> list:
    """The values a call is given besides its tensors: the constants of `x * 0.5` or of
    `keras.ops.add(x, np.array(...))` (positional or keyword arguments with no tensor in them)."""
    return [value for value in [*node.args, *node.kwargs.values()] if _is_constant(value)]


def _is_constant(value) -> bool:
    """Whether a call argument is a constant: not None, a string or a flag, and holds no tensor."""
    if value is None or isinstance(value, (str, bool)):
        return False
    return not any(isinstance(v, TensorRef) for v in keras.tree.flatten(value))


def _array(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value)


def _width(value) -> int:
    """The extent of a constant along the channel (last) axis: 1 for a scalar."""
    a = _array(value)
    return int(a.shape[-1]) if a.ndim else 1


class Elementwise(Handler):
    """Element-wise layers and keras.ops operations (Add, Multiply, Maximum, ...; relu6, exp,
    clip, ...): channel i of every input that spans the channels is one channel, tied; an input
    or a constant with a single channel broadcasts over all of them (CBAM's (H, W, C) * (H, W, 1));
    a constant with one value per channel is cut to the kept channels in the slim model."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        constants = _constants(ctx.node)
        widths = [len(ids) for ids in in_ids] + [_width(c) for c in constants]
        width = max(widths)
        if any(w not in (1, width) for w in widths):
            _fail(layer, f"combines {sorted(set(widths))} channels; only a single channel broadcasts over the others.")
        full = [ids for ids in in_ids if len(ids) == width]
        if not full:  # a one-channel tensor spread over a constant's channels: new, fixed channels
            ids = ctx.new_group(layer, width)
            ctx.pin(ids, f"{_who(layer)} spreads one channel over a constant's {width}")
            return ids
        for other in full[1:]:
            ctx.tie(full[0], other, layer)
        if width > 1 and not is_layer(layer) and any(_width(v) == width for v in _config_arrays(layer)):
            ctx.pin(full[0], f"{_who(layer)} holds per-channel constants in its configuration")
        return full[0]

    def arguments(self, layer, args, kwargs, keep_out):
        def cut(value):
            if not _is_constant(value):
                return value
            a = _array(value)
            if a.ndim == 0 or a.shape[-1] == 1:
                return value
            kept = a[..., keep_out]
            return kept.tolist() if isinstance(value, (list, tuple)) else kept

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _config_arrays(layer) -> list:
    """The array-like values of an operation's configuration (Clip's bounds may be arrays)."""
    try:
        config = layer.get_config()
    except NotImplementedError:
        return []
    out = []
    for value in config.values():
        if isinstance(value, (list, tuple, np.ndarray)) or keras.ops.is_tensor(value):
            try:
                a = _array(value)
            except (TypeError, ValueError):
                continue
            if a.dtype.kind in "fiu":
                out.append(a)
    return out


class Merge(Elementwise):
    """Add, Subtract, Multiply, Average, Maximum, Minimum layers (see Elementwise)."""


class Concatenate(Handler):
    """Concatenate (layer or keras.ops) on the channel axis stacks channel ids; on another axis
    it ties them."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        if layer.axis == -1 or layer.axis == len(in_shapes[0]) - 1:
            return np.concatenate(in_ids)
        return Merge().map_channels(layer, in_ids, in_shapes, ctx)


class Reduction(Handler):
    """keras.ops reductions (mean, sum, max, ...). Over other axes than the channels (and the
    batch) they are channel-wise. Over the channels they make a new last axis, which is pinned;
    their input is pinned too unless a removed channel, zero, changes nothing (a sum)."""

    def __init__(self, zeros_neutral: bool = False):
        self.zeros_neutral = zeros_neutral

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        rank = len(in_shapes[0])
        axis = layer.axis
        axes = range(rank) if axis is None else axis if isinstance(axis, (list, tuple)) else [axis]
        axes = {int(a) % rank for a in axes}
        if 0 in axes:
            _fail(layer, "reduces over the batch axis.")
        if rank - 1 not in axes:
            return in_ids[0]
        out_shape = ctx.node.outputs[0].shape
        if len(out_shape) < 2:
            _fail(layer, "reduces the tensor to no channel axis.")
        if not self.zeros_neutral:
            ctx.pin(in_ids[0], f"{_who(layer)} reduces over the channels")
        ids = ctx.new_group(layer, out_shape[-1])
        ctx.pin(ids, f"{_who(layer)} makes its channels out of the ones it reduces")
        return ids


class SoftmaxOp(Handler):
    """keras.ops softmax and log_softmax: channel-mixing over the channel axis, else channel-wise."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        rank = len(in_shapes[0])
        axis = layer.axis
        axes = {int(a) % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])}
        if rank - 1 in axes:
            ctx.pin(in_ids[0], f"{_who(layer)} mixes channels")
        return in_ids[0]


class ChannelsStayLast(Handler):
    """A layer or operation that moves axes (Permute, transpose, expand_dims, squeeze): fine
    while the channel axis stays last, an error otherwise."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        rank = len(in_shapes[0])
        if not self.keeps_last(layer, rank, in_shapes[0], ctx.node.outputs[0].shape):
            _fail(layer, f"moves the channel axis: {tuple(in_shapes[0])} becomes {tuple(ctx.node.outputs[0].shape)}.")
        return in_ids[0]

    @staticmethod
    def keeps_last(layer, rank, in_shape, out_shape) -> bool:
        def normalized(axis, n):
            return {int(a) % n for a in (axis if isinstance(axis, (list, tuple)) else [axis])}

        if isinstance(layer, keras.layers.Permute):
            return layer.dims[-1] == rank - 1
        name = type(layer).__name__
        if name == "Transpose":
            return layer.axes is not None and int(layer.axes[-1]) % rank == rank - 1
        if name == "ExpandDims":
            return len(out_shape) - 1 not in normalized(layer.axis, len(out_shape))
        if name == "Squeeze":
            return in_shape[-1] != 1 if layer.axis is None else rank - 1 not in normalized(layer.axis, rank)
        return False


class Unsupported(Handler):
    def __init__(self, reason: str):
        self.reason = reason

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _fail(layer, self.reason)


def kernel_of(layer):
    """The kernel that holds `layer`'s output channels: a separable convolution's pointwise
    kernel, any other layer's `kernel`. Its output channels lie on the axis its handler's
    `output_axis` names: the last, except for a transposed convolution's (..., out, in)."""
    return layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel


def filters(kernel, output_axis: int = -1):
    """A kernel (numpy or Keras tensor) as (everything else, output channels): one column per
    output channel's filter."""
    if output_axis != -1:
        kernel = keras.ops.moveaxis(kernel, output_axis, -1)
    return keras.ops.reshape(kernel, (-1, keras.ops.shape(kernel)[-1]))


_REGISTRY: dict[type, Handler] = {}


def op_class(fn, *example_args) -> type:
    """The Operation class that keras.ops function `fn` leaves in a functional model, found by
    calling it on symbolic tensors (of shape (1, 4, 4, 8): one, then two, unless `example_args`
    are given)."""
    tries = [example_args] if example_args else [(keras.KerasTensor((1, 4, 4, 8)),) * n for n in (1, 2)]
    for args in tries:
        try:
            out = fn(*args)
        except Exception:  # noqa: BLE001 - a wrong arity, or arguments fn does not take: try the next
            continue
        found = keras_private.producer(keras.tree.flatten(out)[0]) if isinstance(out, keras.KerasTensor) else None
        if found is not None:
            return type(found[0])
    raise TypeError(
        f"Cannot tell which operation {getattr(fn, '__name__', fn)!r} makes: call "
        "channels.op_class(fn, *example_args) with symbolic (keras.KerasTensor) arguments it accepts."
    )


def _as_class(target) -> type:
    """A Layer or Operation class, given one, or given the keras.ops function that makes one."""
    if isinstance(target, type):
        if issubclass(target, keras.Operation):
            return target
    elif callable(target):
        return op_class(target)
    raise TypeError(
        f"layer_class must be a keras Layer class, a keras.ops Operation class or a keras.ops function. "
        f"Received: {target!r}"
    )


def _check_pair(layer_class, handler) -> type:
    layer_class = _as_class(layer_class)
    if not isinstance(handler, Handler):
        raise TypeError(
            f"handler for {layer_class.__name__} must be a tfsubspace.prune.channels.Handler. Received: {handler!r}"
        )
    return layer_class


def register(layer_class, handler: Handler) -> None:
    """Registers `handler` for `layer_class` and its subclasses (replacing any earlier one), for
    every analysis; to use a handler in one analysis only, pass analyze(model, handlers=...).

    `layer_class` is a Layer class, an Operation class, or a keras.ops function such as
    `keras.ops.erf`, which stands for the Operation it puts in a graph (see op_class)."""
    _REGISTRY[_check_pair(layer_class, handler)] = handler


def check_handlers(handlers: dict | None) -> dict:
    """A copy of a per-call {layer class: handler} mapping, each pair checked (a keras.ops
    function key becomes its Operation class)."""
    return {_check_pair(cls, handler): handler for cls, handler in (handlers or {}).items()}


def handler_for(layer, handlers: dict | None = None) -> Handler:
    """The handler of `layer`'s class (or of its nearest base class): from `handlers` (one
    analysis's own) first, then from the registry; resolved for this layer's configuration."""
    for cls in type(layer).__mro__:
        handler = (handlers or {}).get(cls) or _REGISTRY.get(cls)
        if handler is not None:
            return handler.resolve(layer)
    if is_layer(layer):
        _fail(
            layer,
            "no channel handler is registered for this layer type; register one with "
            "tfsubspace.register_layer_handler(LayerClass, handler).",
        )
    _fail(
        layer,
        "no channel handler is registered for this operation; register one with "
        "tfsubspace.register_layer_handler(keras.ops.<the function that made it>, handler).",
    )


L = keras.layers
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D):
    register(_cls, Convolution())
register(L.Dense, DenseProducer())
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register(_cls, TransposeProducer())
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register(_cls, Depthwise())
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register(_cls, Separable())
for _cls in (L.BatchNormalization, L.PReLU):
    register(_cls, Follower())
register(L.GroupNormalization, GroupNorm())
for _cls in (L.LayerNormalization, L.RMSNormalization, L.Softmax, L.UnitNormalization):
    register(_cls, ChannelMixing())
for _cls in (
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
):
    register(_cls, PassThrough())
register(L.Rescaling, Rescaling())
register(L.Normalization, Pinned())
register(L.Flatten, Flatten())
register(L.Reshape, Reshape())
register(L.Permute, ChannelsStayLast())
for _cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
    register(_cls, Merge())
register(L.Concatenate, Concatenate())
register(
    L.Lambda,
    Unsupported(
        "a Lambda layer runs arbitrary code that may touch channels; "
        "replace it with a registered layer or register a handler for a custom layer."
    ),
)
# Layers of keras.applications models that Keras does not export: ConvNeXt's per-channel scale and
# its residual branch dropped per sample; InceptionResNetV2's `x + scale * residual`.
for _module, _name, _handler in (
    ("convnext", "LayerScale", LayerScale()),
    ("convnext", "StochasticDepth", PassThrough()),
    ("inception_resnet_v2", "CustomScaleLayer", Merge()),
):
    _cls = keras_private.application_layer(_module, _name)
    if _cls is not None:
        register(_cls, _handler)

# keras.ops operations, as a functional model holds them. Element-wise: operations between
# tensors (or with constants), and activations and other functions of one value.
_OPS = {
    Elementwise(): {
        "numpy": (
            "Add Subtract Multiply Divide TrueDivide DivideNoNan Maximum Minimum Power Fmax Fmin "
            "Abs Absolute Fabs Negative Square Sqrt Exp Exp2 Expm1 Log Log1p Log2 Log10 Tanh Sinh Cosh Sin Cos "
            "Sign Clip Reciprocal Floor Ceil Round Trunc NanToNum"
        ),
        "nn": (
            "Relu Relu6 Sigmoid HardSigmoid HardSilu Silu Gelu Elu Selu Celu LeakyRelu Softplus Softsign "
            "Mish LogSigmoid HardTanh TanhShrink SoftShrink HardShrink Squareplus SparsePlus Threshold"
        ),
        "math": "Erf Erfc Rsqrt",
        "core": "Cast StopGradient ConvertToTensor",
    },
    Reduction(): {"numpy": "Mean Max Min Amax Amin Prod Std Var"},
    Reduction(zeros_neutral=True): {"numpy": "Sum"},
    SoftmaxOp(): {"nn": "Softmax LogSoftmax"},
    Reshape(): {"numpy": "Reshape"},
    Concatenate(): {"numpy": "Concatenate"},
    ChannelsStayLast(): {"numpy": "Transpose ExpandDims Squeeze"},
}
for _handler, _modules in _OPS.items():
    for _module, _names in _modules.items():
        for _name in _names.split():
            _cls = keras_private.op_class(_module, _name)
            if _cls is not None:
                register(_cls, _handler)
del L, _cls, _module, _name, _handler, _modules, _names
