import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tfsubspace.errors import TfSubspaceError
from tfsubspace.train.checkpoint import EpochCheckpoint


def tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs)))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_restore_brings_back_weights_optimizer_and_epoch(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = tiny_model()
    checkpoint = EpochCheckpoint(tmp_path / "backup", delete_on_success=False)
    model.fit(x, y, epochs=3, batch_size=16, callbacks=[checkpoint], verbose=0)
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["epoch-00003.weights.h5"]

    # A half-written backup of a later epoch, as a kill during a save leaves it, is ignored.
    (tmp_path / "backup" / ".tmp-abc-epoch-00004.weights.h5").write_bytes(b"\x89HDF")
    fresh = tiny_model()
    assert EpochCheckpoint(tmp_path / "backup").restore(fresh) == 3
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 12


def test_no_backup_means_epoch_zero_and_corrupt_backup_is_named(tmp_path):
    assert EpochCheckpoint(tmp_path / "none").restore(tiny_model()) == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "epoch-00002.weights.h5").write_bytes(b"garbage")
    with pytest.raises(TfSubspaceError, match="Cannot resume from .*epoch-00002.weights.h5"):
        EpochCheckpoint(tmp_path / "b").restore(tiny_model())


def test_backup_removed_after_success(tmp_path):
    x = np.zeros((8, 4), "float32")
    tiny_model().fit(x, np.zeros(8, "int32"), epochs=1, callbacks=[EpochCheckpoint(tmp_path / "b")], verbose=0)
    assert not (tmp_path / "b").exists()


def test_history_logger_cuts_rows_a_resumed_run_repeats(tmp_path):
    from tfsubspace.train.checkpoint import history_logger

    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.5\n2,0.4\n")  # epoch 2 was logged, then the run was killed
    history_logger(path, initial_epoch=2)
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.5\n"
    history_logger(path, initial_epoch=0)
    assert not path.exists()


def test_a_resumed_fit_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    """Same data order (a seeded tf.data shuffle skipped ahead), same Dropout masks, same Adam
    state: killed after epoch 1 and resumed, training ends where it would have."""
    import tensorflow as tf

    from tfsubspace.train import distribute

    x = np.random.default_rng(0).normal(size=(96, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def model_and_data():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(16, activation="relu")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model, tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=3).batch(16)

    class Killed(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    straight, ds = model_and_data()
    distribute.fit(straight, ds, epochs=3, verbose=0)

    model, ds = model_and_data()
    checkpoint = EpochCheckpoint(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        distribute.fit(model, ds, epochs=3, callbacks=[checkpoint, Killed()], verbose=0)
    resumed, ds = model_and_data()
    initial_epoch = EpochCheckpoint(tmp_path / "b").restore(resumed)
    assert initial_epoch == 1
    distribute.fit(resumed, ds, epochs=3, initial_epoch=initial_epoch, verbose=0)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_backup_whose_optimizer_state_does_not_fit_is_refused(tmp_path):
    x = np.zeros((8, 4), "float32")
    model = tiny_model()
    model.fit(
        x,
        np.zeros(8, "int32"),
        epochs=1,
        verbose=0,
        callbacks=[EpochCheckpoint(tmp_path / "b", delete_on_success=False)],
    )
    fresh = tiny_model()
    fresh.layers[1].trainable = False  # its optimizer now has fewer variables than the saved one
    fresh.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(TfSubspaceError, match="Cannot resume from .*Skipping variable loading for optimizer"):
        EpochCheckpoint(tmp_path / "b").restore(fresh)


@pytest.mark.slow
def test_a_resumed_fit_under_mirrored_strategy_repeats_the_uninterrupted_one(tmp_path):
    """The same under MirroredStrategy on two logical CPUs, where Keras makes one more pass
    per fit() call than per epoch (so the passes to skip are measured per epoch)."""
    code = textwrap.dedent("""
        import sys
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tfsubspace.train import distribute
        from tfsubspace.train.checkpoint import EpochCheckpoint
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        x = np.random.default_rng(0).normal(size=(96, 4)).astype("float32")
        y = (x[:, 0] > 0).astype("int32")

        def model_and_data():
            keras.utils.set_random_seed(0)
            with strategy.scope():
                inputs = keras.Input((4,))
                hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(16, activation="relu")(inputs))
                model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
                model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return model, tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=3).batch(16)

        class Killed(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raise KeyboardInterrupt

        straight, ds = model_and_data()
        distribute.fit(straight, ds, epochs=3, verbose=0, strategy=strategy)
        model, ds = model_and_data()
        try:
            distribute.fit(model, ds, epochs=3, verbose=0, strategy=strategy,
                           callbacks=[EpochCheckpoint(sys.argv[1]), Killed()])
        except KeyboardInterrupt:
            pass
        resumed, ds = model_and_data()
        with strategy.scope():
            epoch = EpochCheckpoint(sys.argv[1]).restore(resumed)
        distribute.fit(resumed, ds, epochs=3, initial_epoch=epoch, verbose=0, strategy=strategy)
        pairs = zip(straight.weights, resumed.weights)
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)
        print("EPOCH", epoch, "DIFF", diff)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row for row in result.stdout.splitlines() if row.startswith("EPOCH")] == ["EPOCH 1 DIFF 0.0"]
