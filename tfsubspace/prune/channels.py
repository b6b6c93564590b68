"""How each layer type maps channels: the one place that knows it.

A channel is named by an integer id; a tensor's last axis is an array of ids (an id may
appear several times: Flatten repeats each channel once per pixel, a depthwise layer once
per multiplier). Every supported layer type has a handler with the same four jobs:

- `map_channels`: the ids of the output from the ids of the inputs (a producer starts a
  new group, a merge ties its inputs' channels together, a follower passes them on);
- `rebuild`: a new layer for the kept input and output positions;
- `slice_weights`: the layer's weights cut to the kept positions, in get_weights() order;
- `count_params`: the parameter count for given kept input and output counts.

`kernel_of(layer)` is the weight that holds a producer's output channels.

`register(layer_class, handler)` adds or replaces a handler, so a custom layer can take
part; a layer whose class has no handler is an error that names it.
"""

from __future__ import annotations

import math
from typing import Protocol

import keras
import numpy as np

from tfsubspace.errors import UnsupportedModelError

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
    """What a handler may ask of the analysis while mapping channels."""

    def new_group(self, layer, size: int) -> np.ndarray: ...
    def tie(self, a: np.ndarray, b: np.ndarray, layer) -> None: ...
    def pin(self, ids: np.ndarray, reason: str) -> None: ...


def _fail(layer, reason: str):
    raise UnsupportedModelError(f"Layer {layer.name!r} ({type(layer).__name__}): {reason}")


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

    def map_channels(self, layer, in_ids: list[np.ndarray], in_shapes: list[tuple], ctx: ChannelContext) -> np.ndarray:
        if len(in_ids) != 1:
            _fail(layer, f"expected one input, found {len(in_ids)}.")
        return in_ids[0]

    def rebuild(self, layer, keep_in: list[np.ndarray], keep_out: np.ndarray):
        return type(layer).from_config(layer.get_config())

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
        ctx.pin(in_ids[0], f"{type(layer).__name__} {layer.name!r} mixes channels")
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


class Pinned(Handler):
    """A layer that keeps every channel it sees (its weights are whole-tensor constants, such as
    an adapted Normalization's mean, variance and count): its group is pinned, its weights kept."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        ctx.pin(in_ids[0], f"{type(layer).__name__} {layer.name!r} holds per-channel constants it cannot drop")
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

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _check_channels_last(layer)
        if getattr(layer, "groups", 1) != 1:
            _fail(layer, f"grouped convolution (groups={layer.groups}) is not supported.")
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


class TransposeProducer(Producer):
    """Conv2DTranspose and friends: the kernel is (..., out, in)."""

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
    """Reshape that keeps the channel axis last, or flattens to one axis."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        target = tuple(layer.target_shape)
        in_shape = in_shapes[0]
        if target and target[-1] == in_shape[-1]:
            return in_ids[0]
        if len(target) == 1:
            return _flatten_ids(layer, in_ids[0], in_shape)
        _fail(layer, f"reshapes {tuple(in_shape[1:])} to {target}, which moves the channel axis.")

    def rebuild(self, layer, keep_in, keep_out):
        target = list(layer.target_shape)
        target[-1] = int(len(keep_out))
        return _rebuilt(layer, target_shape=tuple(target))


class Merge(Handler):
    """Add, Subtract, Multiply, Average, Maximum, Minimum: channel i of every input is one."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        first = in_ids[0]
        for other in in_ids[1:]:
            if len(other) != len(first):
                _fail(layer, f"merges inputs of {len(first)} and {len(other)} channels (broadcasting over channels).")
            ctx.tie(first, other, layer)
        return first


class Concatenate(Handler):
    """Concatenate on the channel axis stacks channel ids; on another axis it ties them."""

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        if layer.axis == -1 or layer.axis == len(in_shapes[0]) - 1:
            return np.concatenate(in_ids)
        return Merge().map_channels(layer, in_ids, in_shapes, ctx)


class Unsupported(Handler):
    def __init__(self, reason: str):
        self.reason = reason

    def map_channels(self, layer, in_ids, in_shapes, ctx):
        _fail(layer, self.reason)


def kernel_of(layer):
    """The kernel that holds `layer`'s output channels: a separable convolution's pointwise
    kernel, any other layer's `kernel`. Its output channels lie on the last axis, except for a
    transposed convolution (TransposeProducer), whose kernel is (..., out, in)."""
    return layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel


_REGISTRY: dict[type, Handler] = {}


def _check_pair(layer_class, handler) -> None:
    if not isinstance(layer_class, type) or not issubclass(layer_class, keras.layers.Layer):
        raise TypeError(f"layer_class must be a keras Layer class. Received: {layer_class!r}")
    if not isinstance(handler, Handler):
        raise TypeError(
            f"handler for {layer_class.__name__} must be a tfsubspace.prune.channels.Handler. Received: {handler!r}"
        )


def register(layer_class: type, handler: Handler) -> None:
    """Registers `handler` for `layer_class` and its subclasses (replacing any earlier one), for
    every analysis; to use a handler in one analysis only, pass analyze(model, handlers=...)."""
    _check_pair(layer_class, handler)
    _REGISTRY[layer_class] = handler


def check_handlers(handlers: dict | None) -> dict:
    """A copy of a per-call {layer class: handler} mapping, each pair checked."""
    for layer_class, handler in (handlers or {}).items():
        _check_pair(layer_class, handler)
    return dict(handlers or {})


def handler_for(layer, handlers: dict | None = None) -> Handler:
    """The handler of `layer`'s class (or of its nearest base class): from `handlers` (one
    analysis's own) first, then from the registry."""
    for cls in type(layer).__mro__:
        handler = (handlers or {}).get(cls) or _REGISTRY.get(cls)
        if handler is not None:
            return handler
    _fail(
        layer,
        "no channel handler is registered for this layer type; register one with "
        "tfsubspace.prune.channels.register(LayerClass, handler).",
    )


L = keras.layers
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D):
    register(_cls, Producer())
register(L.Dense, DenseProducer())
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register(_cls, TransposeProducer())
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register(_cls, Depthwise())
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register(_cls, Separable())
for _cls in (L.BatchNormalization, L.PReLU):
    register(_cls, Follower())
for _cls in (L.LayerNormalization, L.Softmax, L.UnitNormalization):
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
del L, _cls
