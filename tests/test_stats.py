import keras
import pytest

from tfsubspace import models, stats
from tfsubspace.errors import UnsupportedModelError


def single(layer, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    "layer, shape, macs",
    [
        # 8x8 output positions x 3x3 kernel x 3 inputs x 4 filters
        (keras.layers.Conv2D(4, 3, padding="same"), (8, 8, 3), 8 * 8 * 9 * 3 * 4),
        # valid padding, stride 2: 3x3 outputs
        (keras.layers.Conv2D(5, 3, strides=2), (8, 8, 2), 3 * 3 * 9 * 2 * 5),
        # grouped: each filter sees 4 / 2 input channels
        (keras.layers.Conv2D(6, 1, groups=2), (5, 5, 4), 5 * 5 * 1 * 2 * 6),
        (keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (6, 6, 3), 6 * 6 * 9 * 3 * 2),
        (keras.layers.SeparableConv2D(7, 3, padding="same"), (6, 6, 3), 6 * 6 * (9 * 3 + 3 * 7)),
        (keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same"), (4, 4, 5), 4 * 4 * 9 * 5 * 2),
        (keras.layers.Conv1D(4, 3), (10, 2), 8 * 3 * 2 * 4),
        (keras.layers.Dense(5), (10,), 50),
        (keras.layers.Dense(5), (3, 10), 150),
        (keras.layers.BatchNormalization(), (4, 4, 3), 0),
        (keras.layers.MaxPooling2D(), (4, 4, 3), 0),
    ],
)
def test_macs_by_hand(layer, shape, macs):
    assert stats.count_macs(single(layer, shape)) == macs


def test_lenet5_macs_by_hand():
    expected = 28 * 28 * 25 * 6 + 10 * 10 * 25 * 6 * 16 + 400 * 120 + 120 * 84 + 84 * 10
    assert stats.count_macs(models.lenet5()) == expected


def test_nested_model_is_expanded_and_shared_layers_count_per_call():
    inner = single(keras.layers.Dense(4, name="inner_dense"), (3,))
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    outputs = inner(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    rows = {r.name: r for r in stats.layer_stats(model)}
    assert rows["inner_dense"].macs == 12
    assert rows["shared"].macs == 2 * 9
    assert stats.count_macs(model) == 30
    assert sum(r.params for r in rows.values()) == stats.count_params(model)


def test_unknown_spatial_size_is_an_error_naming_the_layer():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c")(inputs))
    with pytest.raises(UnsupportedModelError, match="'c' has an unknown input or output size"):
        stats.count_macs(model)


def test_not_a_model():
    with pytest.raises(UnsupportedModelError, match="Expected a keras.Model"):
        stats.layer_stats("model.keras")
