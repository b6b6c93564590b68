"""The oneDNN heap overflow in strided 1x1 convolution weight gradients (tfsubspace.train.onednn).

TensorFlow 2.21 (oneDNN v3.7.3) corrupts the heap in Conv2DBackpropFilter of a 1x1 convolution
with strides > 1 when its input has fewer channels than oneDNN's channel block (16 with
AVX-512, 8 with AVX2) and the spatial sizes are multiples of the stride: training a
mini-Xception (its residual shortcuts are Conv2D(1x1, strides=2)) dies with SIGSEGV/SIGABRT.
The training runs here go in a child process, so that a crash fails the test instead of
killing pytest. The child forces oneDNN on (TF_ENABLE_ONEDNN_OPTS=1: TensorFlow only turns it
on by itself on CPUs with AVX512-VNNI/BF16, AVX-VNNI or AMX) and, where glibc has it, checks
the heap at every free (MALLOC_CHECK_=3), so an overflow fails at once rather than by chance.
"""

import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = textwrap.dedent('''
    import keras
    from keras import layers
    from keras.regularizers import l2


    def mini_xception(stem=8, widths=(16, 32, 64, 128), classes=7):
        """A mini-Xception (as in emotion-recognition packages): two 3x3 convolutions, then
        residual modules of two SeparableConv2D + BatchNormalization, MaxPooling2D(3, 2, same),
        added to a Conv2D(1x1, strides=2) + BatchNormalization shortcut; 64x64x1 input."""
        reg = l2(0.01)
        inputs = keras.Input((64, 64, 1))
        x = inputs
        for _ in range(2):
            x = layers.Conv2D(stem, 3, use_bias=False, kernel_regularizer=reg)(x)
            x = layers.Activation("relu")(layers.BatchNormalization()(x))
        for width in widths:  # the first shortcut sees a 60x60 map: a multiple of its stride
            shortcut = layers.Conv2D(width, 1, strides=2, padding="same", use_bias=False)(x)
            shortcut = layers.BatchNormalization()(shortcut)
            x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False, depthwise_regularizer=reg,
                                       pointwise_regularizer=reg)(x)
            x = layers.Activation("relu")(layers.BatchNormalization()(x))
            x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False, depthwise_regularizer=reg,
                                       pointwise_regularizer=reg)(x)
            x = layers.BatchNormalization()(x)
            x = layers.add([layers.MaxPooling2D(3, strides=2, padding="same")(x), shortcut])
        x = layers.GlobalAveragePooling2D()(layers.Conv2D(classes, 3, padding="same")(x))
        return keras.Model(inputs, layers.Activation("softmax", name="predictions")(x))
''')

FIT = MODEL + textwrap.dedent("""
    import numpy as np
    from tfsubspace.train import onednn

    keras.utils.set_random_seed(0)
    # 4 stem channels: fewer than the channel block of AVX2 (8) as well as AVX-512 (16)
    model = mini_xception(stem=4, widths=(16, 32))
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((64, 64, 64, 1), dtype=np.float32)
    y = np.arange(64) % 7
    with onednn.strided_pointwise_workaround([model], log=print, force=True):
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all(), history.history
    print("TRAINED", flush=True)
""")

COMPRESS = MODEL + textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    import tfsubspace

    keras.utils.set_random_seed(0)
    model = mini_xception()  # the shortcut of the first module sees 8 channels; the student's may see fewer
    rng = np.random.default_rng(0)
    images = rng.random((64, 64, 64, 1), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(64) % 7)).batch(32)
    # adapt="none": the random images, far from the untrained model's statistics, would be adapted first
    result = tfsubspace.compress(model, ds, work_dir=sys.argv[1], epochs=1, recover_epochs=0, stats_batches=2,
                                 bn_batches=2, verbose=0, adapt="none")
    print("COMPRESSED", result.student.count_params(), flush=True)
""")


def _run_child(source: str, tmp_path, *args, timeout=240):
    script = tmp_path / "child.py"
    script.write_text(source)
    env = dict(
        os.environ,
        TF_ENABLE_ONEDNN_OPTS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        MALLOC_CHECK_="3",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("TFSUBSPACE_ONEDNN_WORKAROUND", None)
    debug = sorted(glob.glob("/usr/lib*/*/libc_malloc_debug.so.0") + glob.glob("/lib*/*/libc_malloc_debug.so.0"))
    if debug:  # glibc >= 2.34 keeps MALLOC_CHECK_ in this library
        env["LD_PRELOAD"] = " ".join(filter(None, [debug[0], env.get("LD_PRELOAD")]))
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        died = ""
        if proc.returncode < 0:
            died = f" (killed by {signal.Signals(-proc.returncode).name}: the oneDNN heap overflow, if SIGSEGV/SIGABRT)"
        pytest.fail(
            f"child exited with {proc.returncode}{died}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


@pytest.mark.slow
def test_mini_xception_trains_with_onednn_under_the_workaround(tmp_path):
    out = _run_child(FIT, tmp_path)
    assert "TRAINED" in out
    assert "strided 1x1 convolution(s) (" in out  # the log line names the rewritten shortcuts


@pytest.mark.slow
def test_compress_mini_xception_with_onednn(tmp_path):
    """The issue itself: compress() on a mini-Xception, distillation included (otherwise defaults)."""
    out = _run_child(COMPRESS, tmp_path, str(tmp_path / "work"))
    assert "COMPRESSED" in out


def test_the_rewrite_is_exact_and_scoped():
    """Outputs and gradients with and without the rewrite agree, on shapes whose strided 1x1
    gradient takes a kernel without the overflow (sizes not multiples of the stride), and the
    Keras hook is back in place after the block."""
    import keras
    import tensorflow as tf

    from tfsubspace.train import onednn

    rng = np.random.default_rng(0)
    base = onednn._conv_base()
    original = vars(base)["convolution_op"]
    cases = [
        ((63, 61, 3), keras.layers.Conv2D(5, 1, strides=(2, 3), padding="same")),
        ((63, 63, 16), keras.layers.Conv2D(8, 1, strides=2, padding="valid", use_bias=False)),
        ((9, 11, 7, 3), keras.layers.Conv3D(4, 1, strides=2, padding="same")),
        ((63, 63, 3), keras.layers.Conv2D(4, 3, strides=2)),
    ]  # not 1x1: left alone
    for shape, layer in cases:
        inputs = keras.Input(shape)
        model = keras.Model(inputs, layer(inputs))
        x = tf.constant(rng.random((2, *shape), dtype=np.float32))

        def outputs_and_gradients():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x)
                loss = tf.reduce_sum(y * y)
            return [y] + tape.gradient(loss, [x] + model.trainable_weights)

        expected = outputs_and_gradients()
        with onednn.strided_pointwise_workaround(force=True):
            with onednn.strided_pointwise_workaround(force=True):  # nested
                pass
            assert vars(base)["convolution_op"] is not original
            got = outputs_and_gradients()
        assert vars(base)["convolution_op"] is original
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
        rewritten = onednn.strided_pointwise_layers(model)
        assert rewritten == ([] if layer.kernel_size[0] == 3 else [layer.name])


def test_the_workaround_is_off_without_onednn(monkeypatch):
    from tfsubspace.train import onednn

    monkeypatch.setattr(onednn, "onednn_enabled", lambda: False)
    with onednn.strided_pointwise_workaround() as active:
        assert active is False
    monkeypatch.setattr(onednn, "onednn_enabled", lambda: True)
    monkeypatch.setenv("TFSUBSPACE_ONEDNN_WORKAROUND", "0")
    with onednn.strided_pointwise_workaround() as active:
        assert active is False
