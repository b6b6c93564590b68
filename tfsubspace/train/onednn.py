"""A workaround for a oneDNN heap overflow in the weight gradient of strided 1x1 convolutions.

TensorFlow 2.21's CPU build (oneDNN v3.7.3) computes Conv2DBackpropFilter of a 1x1 convolution
with strides > 1 with oneDNN's `jit_1x1` backward-weights kernel, which first copies the
strided input into a unit-stride workspace ("reduce to unit stride"). When the input has
fewer channels than the kernel's channel block (16 for AVX-512, 8 for AVX2) that copy writes
outside the workspace: the heap is corrupted and the process dies later, in the same or a
following op, with SIGSEGV or SIGABRT ("malloc(): corrupted top size"). oneDNN picks that kernel
when every spatial size is a multiple of the stride (an even 62x62 input at stride 2, not
63x63), so it fails on every training step of a model such as mini-Xception, whose residual
shortcut is a Conv2D(1x1, strides=2) on 8 channels of a 62x62 map. Forward passes and input
gradients use other kernels and are unaffected. TF_ENABLE_ONEDNN_OPTS=0 avoids it, for the
whole process and only when set before TensorFlow is imported.

For a 1x1 kernel the strided convolution is exactly a unit-stride one on the subsampled input
(a 1x1 kernel needs no padding under "same" or "valid"): y = conv1x1(x[:, ::s, ::s, :]).
`strided_pointwise_workaround()` computes every strided 1x1 Keras convolution that way while
it is active, so the weight gradient is a unit-stride one (no reduce-to-unit-stride copy)
and the gradient of the subsampling is a strided-slice gradient. Weights, configs and saved
models are unchanged; only the ops that a training function traces inside the block differ.

    with onednn.strided_pointwise_workaround(models=[student, teacher], log=print):
        model.fit(...)   # the train function is traced, so rewritten, in the block
"""

from __future__ import annotations

import contextlib
import os
import threading

import keras

__all__ = ["onednn_enabled", "strided_pointwise_layers", "strided_pointwise_workaround", "needs_workaround"]

_lock = threading.Lock()
_depth = 0
_original = None
_base = None


def onednn_enabled() -> bool:
    """Whether this process runs TensorFlow's oneDNN CPU kernels (decided at import from
    TF_ENABLE_ONEDNN_OPTS and the CPU; True when it cannot be told)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() not in ("0", "false")


def needs_workaround() -> bool:
    """True when oneDNN is on and TFSUBSPACE_ONEDNN_WORKAROUND is not "0"."""
    return os.environ.get("TFSUBSPACE_ONEDNN_WORKAROUND", "1") != "0" and onednn_enabled()


def _conv_base():
    """The Keras class that defines convolution_op (BaseConv: Conv2D and Conv3D call it)."""
    global _base
    if _base is None:
        _base = next(c for c in keras.layers.Conv2D.__mro__ if "convolution_op" in vars(c))
    return _base


def _is_strided_pointwise(layer) -> bool:
    kernel_size = getattr(layer, "kernel_size", None)
    strides = getattr(layer, "strides", None)
    return (
        isinstance(layer, _conv_base())
        and kernel_size is not None
        and strides is not None
        and all(k == 1 for k in kernel_size)
        and any(s > 1 for s in strides)
    )


def strided_pointwise_layers(model) -> list[str]:
    """Names of the layers of `model` (nested models included) that the workaround rewrites."""
    names = []
    for layer in getattr(model, "layers", ()):
        if _is_strided_pointwise(layer):
            names.append(layer.name)
        elif getattr(layer, "layers", None):
            names += strided_pointwise_layers(layer)
    return list(dict.fromkeys(names))


def _subsampled_convolution_op(self, inputs, kernel):
    import tensorflow as tf

    if not (_is_strided_pointwise(self) and tf.is_tensor(inputs)):
        return _original(self, inputs, kernel)
    spatial = tuple(slice(None, None, int(s)) for s in self.strides)
    if self.data_format == "channels_first":
        index = (slice(None), slice(None)) + spatial
    else:
        index = (slice(None),) + spatial + (slice(None),)
    return keras.ops.conv(
        inputs[index],
        kernel,
        strides=1,
        padding="valid",
        dilation_rate=self.dilation_rate,
        data_format=self.data_format,
    )


@contextlib.contextmanager
def strided_pointwise_workaround(models=(), *, log=None, force: bool = False):
    """While active, strided 1x1 Keras convolutions compute as a subsample followed by a
    unit-stride 1x1 convolution (see the module docstring). A no-op unless oneDNN is on
    (or `force`). `log` gets one line naming the rewritten layers of `models`, if any.

    Trace the training function inside the block (model.fit does, on its first call after
    compile()); a function traced earlier keeps the ops it was traced with. Nesting and
    threads are fine: the class-level hook stays in place until the outermost block exits.
    """
    global _depth, _original
    if not (force or needs_workaround()):
        yield False
        return
    if log is not None:
        names = [n for m in models for n in strided_pointwise_layers(m)]
        if names:
            names = list(dict.fromkeys(names))
            log(
                f"oneDNN is on: {len(names)} strided 1x1 convolution(s) ({', '.join(names)}) train as a "
                "subsample + unit-stride 1x1 convolution, avoiding a oneDNN heap overflow in their weight "
                "gradient (TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow starts turns oneDNN off instead)"
            )
    base = _conv_base()
    with _lock:
        if _depth == 0:
            _original = vars(base)["convolution_op"]
            base.convolution_op = _subsampled_convolution_op
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                base.convolution_op = _original
