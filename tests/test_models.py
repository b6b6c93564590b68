import keras
import pytest

from tfsubspace import models


def bn(c):
    return 4 * c  # gamma, beta, moving mean, moving variance


def test_lenet5_params_by_hand():
    conv1 = 5 * 5 * 1 * 6 + 6
    conv2 = 5 * 5 * 6 * 16 + 16  # 14x14 -> valid 5x5 -> 10x10 -> pool -> 5x5
    fc1 = 5 * 5 * 16 * 120 + 120
    fc2 = 120 * 84 + 84
    logits = 84 * 10 + 10
    assert models.lenet5((28, 28, 1), 10).count_params() == conv1 + conv2 + fc1 + fc2 + logits == 61706


@pytest.mark.parametrize(
    "width, shape, classes", [(1.0, (32, 32, 3), 10), (0.25, (28, 28, 1), 10), (0.5, (32, 32, 3), 100)]
)
def test_vgg16_params_by_hand(width, shape, classes):
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    widths = [int(round(c * width)) for c in widths]
    total, cin = 0, shape[2]
    for c in widths:
        total += 3 * 3 * cin * c + bn(c)  # conv without bias, then BN
        cin = c
    fc = int(round(512 * width))
    total += cin * fc + bn(fc) + fc * classes + classes  # 1x1 spatial after five 'same' pools
    model = models.vgg16(shape, classes, width=width)
    assert model.count_params() == total
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in model.layers) == 13
    if width == 1.0:
        assert total == 14_996_682


@pytest.mark.parametrize("depth, k, expected", [(16, 4, 2_752_506), (10, 1, None), (28, 10, 36_497_146)])
def test_wide_resnet_params_by_hand(depth, k, expected):
    n = (depth - 4) // 6
    total = 3 * 3 * 3 * 16  # stem
    cin = 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + 3 * 3 * cin * c + bn(c) + 3 * 3 * c * c
            if cin != c:
                total += cin * c  # 1x1 projection shortcut
            cin = c
    total += bn(cin) + cin * 10 + 10
    model = models.wide_resnet((32, 32, 3), 10, depth=depth, widen_factor=k)
    assert model.count_params() == total
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 3 * n
    if expected:
        assert total == expected


def test_fixed_batch_and_small_inputs():
    model = models.build("vgg16", (8, 8, 1), 3, width=0.125, batch_size=1)
    assert model.input_shape == (1, 8, 8, 1) and model.output_shape == (1, 3)
    assert models.build("lenet5", (6, 6, 2), 4).output_shape == (None, 4)
    assert models.build("wrn", (9, 9, 3), 5, depth=10, widen_factor=1).output_shape == (None, 5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: models.build("resnet50", (32, 32, 3), 10), "Known models: lenet5, vgg16, wrn"),
        (lambda: models.wide_resnet(depth=15), "depth must be 6n"),
        (lambda: models.vgg16(width=0), "width must be a positive"),
        (lambda: models.lenet5((28, 28), 10), "input_shape must be"),
        (lambda: models.lenet5((28, 28, 1), 1), "num_classes must be at least 2"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
