"""Reference teachers: VGG-16 for small images, Wide ResNets and a LeNet-5-style net.

All are Keras 3 functional models, built for any input shape of at least 1x1 pixels and any
class count, with layer names that stay stable across widths (so plans and reports line
up). Convolutions followed by BatchNormalization carry no bias; the classifier outputs
logits (no softmax), which is what distillation and the TFLite checks want.
"""

from __future__ import annotations

import keras
from keras import layers

# VGG-16's 13 convolutions: output channels at width 1.0, "M" for a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
MODELS = ("lenet5", "vgg16", "wrn")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_common(input_shape, num_classes):
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) with positive sizes. Received: input_shape={input_shape}"
        )
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2. Received: num_classes={num_classes}")


def vgg16(input_shape=(32, 32, 3), num_classes=10, width: float = 1.0, dropout: float = 0.5, batch_size=None):
    """VGG-16 for small images: 13 conv3x3-BN-ReLU layers, 5 max-pools, a BN'd classifier.

    The classifier is the CIFAR-style head (Flatten, Dense(512*width)-BN-ReLU-Dropout,
    Dense(num_classes)). Pools use 'same' padding, so any input of at least 1x1 works
    (28x28 inputs end at 1x1 like 32x32 ones).

    Args:
        input_shape: (height, width, channels).
        num_classes: number of output logits.
        width: channel multiplier (0.25 gives 16..128 channels).
        dropout: dropout rate before the last Dense.
        batch_size: fixed batch size of the input (1 for Edge TPU/microcontroller export).
    """
    _check_common(input_shape, num_classes)
    if width <= 0:
        raise ValueError(f"width must be a positive float. Received: width={width}")
    inputs = keras.Input(shape=tuple(input_shape), batch_size=batch_size, name="image")
    x = inputs
    conv, pool = 0, 0
    for item in VGG16_CONFIG:
        if item == "M":
            pool += 1
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{pool}")(x)
            continue
        conv += 1
        x = layers.Conv2D(_scaled(item, width), 3, padding="same", use_bias=False, name=f"conv{conv}")(x)
        x = layers.BatchNormalization(name=f"bn{conv}")(x)
        x = layers.ReLU(name=f"relu{conv}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_scaled(512, width), use_bias=False, name="fc1")(x)
    x = layers.BatchNormalization(name="fc1_bn")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    x = layers.Dropout(dropout, name="fc1_dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"vgg16_w{width:g}")


def wide_resnet(
    input_shape=(32, 32, 3),
    num_classes=10,
    depth: int = 16,
    widen_factor: int = 4,
    dropout: float = 0.0,
    batch_size=None,
):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis) with pre-activation blocks.

    A 3x3 stem of 16 channels, three groups of n = (depth - 4) / 6 blocks at 16k, 32k and
    64k channels (strides 1, 2, 2), then BN-ReLU, global average pooling and a Dense. Each
    block is BN-ReLU-conv3x3-BN-ReLU-(Dropout)-conv3x3 added to its shortcut: the identity,
    or a 1x1 strided convolution of the pre-activated input where the shape changes.
    """
    _check_common(input_shape, num_classes)
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...). Received: depth={depth}")
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be a positive integer. Received: widen_factor={widen_factor}")
    n = (depth - 4) // 6
    inputs = keras.Input(shape=tuple(input_shape), batch_size=batch_size, name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    in_channels = 16
    for g, (channels, stride) in enumerate(((16 * widen_factor, 1), (32 * widen_factor, 2), (64 * widen_factor, 2)), 1):
        for b in range(1, n + 1):
            p = f"g{g}b{b}"
            s = stride if b == 1 else 1
            pre = layers.ReLU(name=f"{p}_relu1")(layers.BatchNormalization(name=f"{p}_bn1")(x))
            y = layers.Conv2D(channels, 3, strides=s, padding="same", use_bias=False, name=f"{p}_conv1")(pre)
            y = layers.ReLU(name=f"{p}_relu2")(layers.BatchNormalization(name=f"{p}_bn2")(y))
            if dropout > 0:
                y = layers.Dropout(dropout, name=f"{p}_dropout")(y)
            y = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{p}_conv2")(y)
            if s != 1 or in_channels != channels:
                shortcut = layers.Conv2D(channels, 1, strides=s, use_bias=False, name=f"{p}_shortcut")(pre)
            else:
                shortcut = x
            x = layers.Add(name=f"{p}_add")([shortcut, y])
            in_channels = channels
    x = layers.ReLU(name="final_relu")(layers.BatchNormalization(name="final_bn")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"wrn_{depth}_{widen_factor}")


def lenet5(input_shape=(28, 28, 1), num_classes=10, batch_size=None):
    """A LeNet-5-style net: conv5x5(6)-pool-conv5x5(16)-pool-Dense(120)-Dense(84)-Dense.

    The first convolution pads to keep the input size (classic LeNet-5 padded 28x28 MNIST
    to 32x32); ReLU activations and max-pooling replace the original's tanh and subsampling.
    """
    _check_common(input_shape, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), batch_size=batch_size, name="image")
    x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = layers.Conv2D(16, 5, padding="same" if min(x.shape[1:3]) < 5 else "valid", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="lenet5")


def build(
    name: str,
    input_shape,
    num_classes: int,
    *,
    width: float = 1.0,
    depth: int = 16,
    widen_factor: int = 4,
    batch_size=None,
):
    """Builds a reference model by name (one of MODELS) with the options that apply to it."""
    if name == "lenet5":
        return lenet5(input_shape, num_classes, batch_size=batch_size)
    if name == "vgg16":
        return vgg16(input_shape, num_classes, width=width, batch_size=batch_size)
    if name == "wrn":
        return wide_resnet(input_shape, num_classes, depth=depth, widen_factor=widen_factor, batch_size=batch_size)
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(MODELS)}.")
