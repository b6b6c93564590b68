import keras
import pytest

from tfsubspace import models
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.models import stats


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
    assert rows["shared"].outputs == 2 * 3 and rows["inner_dense"].outputs == 4
    assert stats.count_outputs(model) == 10


def reloaded(model, tmp_path):
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    return keras.models.load_model(path)


# conv 8x8x3 -> 8x8x4 (same), pool -> 4x4x4, conv -> 2x2x6 (valid), dense 24 -> 5
SMALL_CNN_MACS = 8 * 8 * 9 * 3 * 4 + 2 * 2 * 9 * 4 * 6 + 24 * 5


def small_cnn_layers():
    return [
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(6, 3),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ]


def test_loaded_sequential_counts_each_call_once(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), *small_cnn_layers()], name="seq")
    loaded = reloaded(model, tmp_path)
    assert stats.count_macs(model) == stats.count_macs(loaded) == SMALL_CNN_MACS
    assert stats.layer_stats(loaded) == stats.layer_stats(model)


def test_sequential_built_with_add_counts_each_call_once():
    model = keras.Sequential(name="added")
    model.add(keras.Input((8, 8, 3)))
    for layer in small_cnn_layers():
        model.add(layer)
    assert stats.count_macs(model) == SMALL_CNN_MACS


def stack(x, layers):
    for layer in layers:
        x = layer(x)
    return x


def test_loaded_functional_counts_only_its_own_calls(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, stack(inputs, small_cnn_layers()), name="func")
    loaded = reloaded(model, tmp_path)
    assert stats.count_macs(model) == stats.count_macs(loaded) == SMALL_CNN_MACS
    # Rebuilding the model for another batch size calls its layers again, outside its graph.
    batch_one = keras.Input((8, 8, 3), batch_size=1)
    rebuilt = keras.Model(batch_one, stack(batch_one, loaded.layers[1:]))
    assert stats.count_macs(loaded) == stats.count_macs(rebuilt) == SMALL_CNN_MACS


def test_shared_layers_and_nested_models_count_per_call_after_reload(tmp_path):
    conv = keras.layers.Conv2D(3, 3, padding="same", name="shared_conv")
    dense = keras.layers.Dense(4, name="shared_dense")
    inner = single(keras.layers.Dense(4, name="inner_dense"), (4,))
    inputs = keras.Input((5, 5, 3))
    x = keras.layers.GlobalAveragePooling2D()(conv(conv(inputs)))
    outputs = inner(inner(dense(dense(keras.layers.Dense(4)(x)))))
    model = keras.Model(inputs, outputs, name="shared")
    loaded = reloaded(model, tmp_path)
    stack(keras.Input((5, 5, 3)), [loaded.get_layer("shared_conv")])  # a third call, in no model
    per_call = {"shared_conv": 5 * 5 * 9 * 3 * 3, "shared_dense": 16, "inner_dense": 16}
    for m in (loaded, model):
        rows = {r.name: r.macs for r in stats.layer_stats(m)}
        assert {name: rows[name] for name in per_call} == {name: 2 * macs for name, macs in per_call.items()}
        assert stats.count_macs(m) == 2 * sum(per_call.values()) + 3 * 4  # and the unshared Dense(3 -> 4)


def test_unknown_spatial_size_is_an_error_naming_the_layer():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c")(inputs))
    with pytest.raises(UnsupportedModelError, match="'c' has an unknown input or output size"):
        stats.count_macs(model)


def test_not_a_model():
    with pytest.raises(UnsupportedModelError, match="Expected a keras.Model"):
        stats.layer_stats("model.keras")


def test_model_without_a_graph_is_refused_rather_than_counted_as_zero():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(UnsupportedModelError, match="subclassed model"):
        stats.count_macs(Subclassed())
