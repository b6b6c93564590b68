"""TFMOT jobs on rebuilt tf_keras models: quantization-aware training and magnitude pruning.

These run in their own process, in an environment with the `tfmot` extra (`make tfmot`):
importing TFMOT switches tf.keras to tf_keras for the whole process. The models arrive as
layer specs (tfsubspace.peers.bridge.save_spec); the main process calls them through
tfsubspace.edge.qat.export_qat (scripts/export_tflite.py --qat) and benchmarks/tfmot_prune.py.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np

from tfsubspace import fileio


def _distillation_loss(temperature: float, probabilities: bool = False):
    """KL(teacher || student) of the outputs softened at `temperature`, times its square. With
    `probabilities` the models end in a softmax, and the log of their outputs are the logits (up
    to a shift): softening the probabilities themselves would leave nearly uniform targets."""
    import tensorflow as tf

    def loss(teacher_logits, student_logits):
        if probabilities:
            teacher_logits = tf.math.log(tf.maximum(teacher_logits, 1e-12))
            student_logits = tf.math.log(tf.maximum(student_logits, 1e-12))
        p = tf.nn.softmax(teacher_logits / temperature)
        log_ratio = tf.nn.log_softmax(teacher_logits / temperature) - tf.nn.log_softmax(student_logits / temperature)
        return temperature**2 * tf.reduce_sum(p * log_ratio, axis=-1)

    return loss


def _images(ds):
    return ds.map(lambda *b: b[0]) if isinstance(ds.element_spec, tuple) else ds


def _int8_tflite(model, calibration_ds, samples: int = 256) -> bytes:
    import tensorflow as tf

    def representative():
        count = 0
        for batch in _images(calibration_ds):
            for image in np.asarray(batch):
                yield [image[None].astype(np.float32)]
                count += 1
                if count >= samples:
                    return

    # a concrete function of batch 1: static shapes, as export() writes them
    shape = [1, *model.inputs[0].shape[1:]]
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def run_job(path: str | os.PathLike) -> None:
    """Runs the job a JSON file describes (written by tfsubspace.edge.qat.export_qat)."""
    import json

    import tensorflow as tf

    job = json.loads(Path(path).read_text(encoding="utf-8"))
    if job.get("kind") != "qat":
        raise ValueError(f"{path}: unknown job kind {job.get('kind')!r}")
    images = np.load(job["images"], allow_pickle=False)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(64)
    quantization_aware_training(
        job["student"],
        job["teacher"],
        ds,
        job["weights_dir"],
        epochs=job["epochs"],
        learning_rate=job["learning_rate"],
        probabilities=job.get("probabilities", False),
        verbose=job["verbose"],
    )


def _calibrate_ranges(quantized, float_model, images_ds, batches: int = 20) -> None:
    """Starts every activation range of `quantized` at the range the float model's layer
    outputs take on `batches` batches, its input quantizer at the images' range and its kernel
    ranges at the kernels'. TFMOT starts the activation ranges at [-6, 6] and moves them by a
    slow moving average, so a short QAT run would keep clipping wide activations such as
    logits; it starts the input range at [0, 0] and the kernel ranges at [-6, 6], so before its
    first training step the model sees a constant image through kernels rounded to zero."""
    import tf_keras

    layers = [layer for layer in float_model.layers if not isinstance(layer, tf_keras.layers.InputLayer)]
    probe = tf_keras.Model(float_model.inputs, [float_model.inputs[0], *[layer.output for layer in layers]])
    low = high = None
    for i, batch in enumerate(images_ds):
        if i >= batches:
            break
        values = [np.asarray(v) for v in probe(batch, training=False)]
        lo, hi = [float(v.min()) for v in values], [float(v.max()) for v in values]
        low = lo if low is None else np.minimum(low, lo)
        high = hi if high is None else np.maximum(high, hi)
    ranges = {f"quant_{layer.name}": (low[i + 1], high[i + 1]) for i, layer in enumerate(layers)}
    for layer in quantized.layers:
        weights = {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}
        for short, w in weights.items():  # a kernel's range follows the kernel only in training: start it there
            if short in ("kernel_min", "kernel_max") and "kernel" in weights:
                kernel = np.abs(weights["kernel"].numpy())
                largest = kernel.max() if len(w.shape) == 0 else kernel.reshape(-1, kernel.shape[-1]).max(0)
                w.assign(-largest if short == "kernel_min" else largest)
        # quantize_apply names its input quantizer quantize_layer, quantize_layer_1 after a retry
        # (see _quantized), and its range variables after it: LAYER_min, LAYER_max
        is_input = type(layer).__name__ == "QuantizeLayer"
        if not is_input and layer.name not in ranges:
            continue
        lo, hi = (low[0], high[0]) if is_input else ranges[layer.name]
        lo, hi = min(0.0, lo), max(0.0, hi)
        if is_input:
            targets = {f"{layer.name}_min": lo, f"{layer.name}_max": hi}
        else:
            targets = {"post_activation_min": lo, "output_min": lo, "post_activation_max": hi, "output_max": hi}
        for short, w in weights.items():
            if short in targets:
                w.assign(targets[short])


def _quantize_classes():
    """(the scheme, and the custom objects of quantize_scope) that quantize_apply uses here:
    TFMOT's default 8-bit scheme, but every kernel is rounded as the TFLite converter rounds it,
    one scale per output channel. TFMOT's per-axis quantizer takes a DepthwiseConv2D kernel's
    last axis, the depth multiplier (tensorflow/model-optimization#808): one scale for every
    channel, so training rounded the channels of small weights to a few steps the int8 file does
    not have; a Dense kernel got one scale; and a layer whose output TFMOT leaves unquantized
    (before a separate ReLU layer) got its kernel unrounded."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    quantization = tfmot.quantization.keras

    class DepthwiseKernelQuantizer(quantization.quantizers.Quantizer):
        """8-bit symmetric fake quantization (narrow range), a scale per kernel channel."""

        def build(self, tensor_shape, name, layer):
            return {}

        def __call__(self, inputs, training, weights, **kwargs):
            channels = int(inputs.shape[-2]) * int(inputs.shape[-1])  # input channels x depth multiplier
            flat = tf.reshape(inputs, [-1, channels])
            largest = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(flat), axis=0), 1e-8))
            rounded = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                flat, -largest, largest, num_bits=8, narrow_range=True
            )
            return tf.reshape(rounded, tf.shape(inputs))

        def get_config(self):
            return {}

    class KernelQuantizeConfig(quantization.QuantizeConfig):
        """The kernel of a Conv2D, DepthwiseConv2D or Dense rounded as the converter rounds it,
        one scale per output channel, and the activation's output in 8 bits; with
        `activation=False` the output is left to the layer that reads it."""

        def __init__(self, kind, activation=True):
            self.kind, self.activation = kind, activation

        def _attribute(self):
            return "depthwise_kernel" if self.kind == "DepthwiseConv2D" else "kernel"

        def get_weights_and_quantizers(self, layer):
            if self.kind == "DepthwiseConv2D":
                quantizer = DepthwiseKernelQuantizer()
            else:
                quantizer = quantization.quantizers.LastValueQuantizer(
                    num_bits=8, per_axis=True, symmetric=True, narrow_range=True
                )
            return [(getattr(layer, self._attribute()), quantizer)]

        def get_activations_and_quantizers(self, layer):
            if not self.activation:
                return []
            quantizer = quantization.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False
            )
            return [(layer.activation, quantizer)]

        def set_quantize_weights(self, layer, quantize_weights):
            setattr(layer, self._attribute(), quantize_weights[0])

        def set_quantize_activations(self, layer, quantize_activations):
            if self.activation:
                layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {"kind": self.kind, "activation": self.activation}

    class Registry(quantization.default_8bit.Default8BitQuantizeRegistry):
        def get_quantize_config(self, layer):
            if isinstance(layer, (tf_keras.layers.DepthwiseConv2D, tf_keras.layers.Dense)):
                return KernelQuantizeConfig(type(layer).__name__)
            return super().get_quantize_config(layer)

    class Layout(quantization.default_8bit.Default8BitQuantizeLayoutTransform):
        """TFMOT's layout, but where it gives a Conv2D, DepthwiseConv2D or Dense no quantization at
        all to keep its output unquantized (before a separate ReLU layer, or into a
        Concatenate), its kernel is still rounded: the int8 file rounds it."""

        def apply(self, model, layer_quantize_map):
            transformed, quantize_map = super().apply(model, layer_quantize_map)
            for layer in transformed.layers:
                config = quantize_map.get(layer.name, {}).get("quantize_config")
                kind = type(layer).__name__
                if type(config).__name__ == "NoOpQuantizeConfig" and kind in ("Conv2D", "DepthwiseConv2D", "Dense"):
                    quantize_map[layer.name]["quantize_config"] = KernelQuantizeConfig(kind, activation=False)
            return transformed, quantize_map

    class Scheme(quantization.default_8bit.Default8BitQuantizeScheme):
        def get_layout_transformer(self):
            return Layout()

        def get_quantize_registry(self):
            return Registry()

    return Scheme(), {
        "DepthwiseKernelQuantizer": DepthwiseKernelQuantizer,
        "KernelQuantizeConfig": KernelQuantizeConfig,
    }


def _quantized(model):
    """tfmot's quantize_model(model) with per-channel depthwise kernels (_quantize_classes), where a
    layer its default 8-bit scheme refuses (Rescaling, most often: the input scaling of many
    Keras models) gets only its output fake-quantized, as the int8 converter will quantize that
    op's output. Everything else is quantize_model's own choice, its Conv -> BatchNormalization
    folding included."""
    import re

    import tensorflow_model_optimization as tfmot
    import tf_keras

    quantization = tfmot.quantization.keras

    class OutputOnly(quantization.QuantizeConfig):
        """No weights or activations to quantize inside the layer; its output in 8 bits."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            quantizer = quantization.quantizers.MovingAverageQuantizer
            return [quantizer(8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    refused = set()
    scheme, custom = _quantize_classes()

    def annotate(layer):
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer
        return quantization.quantize_annotate_layer(layer, OutputOnly() if layer.name in refused else None)

    while True:  # quantize_apply names one refused layer at a time, after its own rewrites
        try:
            with quantization.quantize_scope({"OutputOnly": OutputOnly, **custom}):
                annotated = tf_keras.models.clone_model(model, clone_function=annotate)
                return quantization.quantize_apply(annotated, scheme)
        except RuntimeError as e:
            found = re.match(r"Layer (.+?):<class", str(e))
            if found is None or found.group(1) in refused:
                raise
            refused.add(found.group(1))


def quantization_aware_training(
    student_spec,
    teacher_spec,
    ds,
    weights_dir: str | os.PathLike,
    *,
    epochs: int = 2,
    learning_rate: float = 1e-4,
    temperature: float = 4.0,
    probabilities: bool = False,
    verbose="auto",
) -> list[Path]:
    """Fine-tunes the student with fake quantization against the teacher's softened outputs
    (no labels) and writes its trained float weights after every epoch to
    `weights_dir`/epoch_K.npz (bridge.save_tf_keras_weights), and the seconds of training up to
    the end of each epoch to `weights_dir`/seconds.json: the main process converts them
    with post-training int8 as it converts any float model (see _trained_float), checks each and
    keeps the best. With `probabilities` both models end in a softmax (see _distillation_loss).

    Activation ranges start at the float model's (see _calibrate_ranges) and BatchNormalization
    layers are frozen: in training mode they would normalize by batch statistics and drift
    their moving averages away from the statistics the model was trained with."""
    import tf_keras

    from tfsubspace.peers.bridge import build_tf_keras, save_tf_keras_weights

    student = build_tf_keras(student_spec)
    teacher = build_tf_keras(teacher_spec)
    teacher.trainable = False
    for layer in student.layers:  # frozen BN runs on its moving statistics, as the int8 model will
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            layer.trainable = False
    quantized = _quantized(student)
    _calibrate_ranges(quantized, student, _images(ds))
    quantized.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate), loss=_distillation_loss(temperature, probabilities)
    )
    written, seconds, start = [], [], time.perf_counter()

    def save(epoch, logs=None):
        path = Path(weights_dir) / f"epoch_{epoch + 1}.npz"
        written.append(save_tf_keras_weights(_trained_float(quantized, student), student_spec, path))
        seconds.append(time.perf_counter() - start)  # of training, up to the end of this epoch
        fileio.write_json(Path(weights_dir) / "seconds.json", seconds)

    pairs = _images(ds).map(lambda x: (x, teacher(x, training=False)))
    callback = tf_keras.callbacks.LambdaCallback(on_epoch_end=save)
    quantized.fit(pairs, epochs=epochs, verbose=verbose, callbacks=[callback])
    return written


def _trained_float(quantized, model):
    """`model` with the weights QAT trained in `quantized` (matched by variable name), for the
    int8 converter to quantize as it quantizes any float model. The per-channel depthwise fake
    quantization (_quantize_classes) is what the converter does to those kernels, but it cannot
    convert that op itself; the activations get their ranges from calibration."""
    trained = {w.name: w for w in quantized.weights}
    for layer in model.layers:
        missing = [w.name for w in layer.weights if w.name not in trained]
        if missing:
            raise ValueError(f"QAT model has no weights {missing} of layer {layer.name!r}")
        if layer.weights:
            layer.set_weights([trained[w.name].numpy() for w in layer.weights])
    return model


def _with_batchnorm_reestimated(model, ds, batches: int = 50):
    """A copy of a tf_keras model with its BatchNormalization statistics measured again on
    `batches` batches (tfsubspace.reestimate_batchnorm). Magnitude pruning moves weights faster
    than BN's moving averages follow, so the comparison reports TFMOT's accuracy as delivered
    and with its statistics measured again."""
    import tf_keras

    from tfsubspace.distill.batchnorm import reestimate_batchnorm

    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    reestimate_batchnorm(copy, ds, batches)
    return copy


def magnitude_pruning(
    model_spec,
    labeled_ds,
    test_ds,
    out_dir: str | os.PathLike,
    *,
    sparsity: float,
    epochs: int,
    learning_rate: float = 3e-4,
    verbose="auto",
) -> dict:
    """TFMOT's low-magnitude pruning (Zhu & Gupta's polynomial schedule to `sparsity` over the
    first two thirds of the steps) with fine-tuning on labels; writes the stripped model as
    float32 and int8 .tflite and returns its test accuracy and sizes (raw and gzip-compressed)."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from tfsubspace.peers.bridge import build_tf_keras

    model = build_tf_keras(model_spec)
    steps = int(labeled_ds.cardinality()) * epochs
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, sparsity, begin_step=0, end_step=max(1, 2 * steps // 3), frequency=max(1, steps // 100)
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    pruned.fit(labeled_ds, epochs=epochs, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=verbose)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    accuracy = float(stripped.evaluate(test_ds, verbose=0)[1])
    remeasured = _with_batchnorm_reestimated(stripped, labeled_ds)
    remeasured.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    accuracy_bn = float(remeasured.evaluate(test_ds, verbose=0)[1])
    kernels = [w for layer in stripped.layers for w in layer.get_weights()[:1] if w.ndim > 1]
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / max(1, sum(k.size for k in kernels))
    nonzero = sum(int(np.count_nonzero(w)) for w in stripped.get_weights())
    out_dir = Path(out_dir)
    float32 = tf.lite.TFLiteConverter.from_keras_model(stripped).convert()
    fileio.write_bytes(out_dir / "float32.tflite", float32)
    int8 = _int8_tflite(stripped, labeled_ds)
    fileio.write_bytes(out_dir / "int8.tflite", int8)
    result = {
        "accuracy": accuracy,
        "accuracy_bn_reestimated": accuracy_bn,
        "kernel_sparsity": zeros,
        "sparsity_target": sparsity,
        "epochs": epochs,
        "params": int(stripped.count_params()),
        "nonzero_params": nonzero,
        "float32_bytes": len(float32),
        "float32_gzip_bytes": len(gzip.compress(float32, 9)),
        "int8_bytes": len(int8),
        "int8_gzip_bytes": len(gzip.compress(int8, 9)),
    }
    fileio.write_json(out_dir / "result.json", result)
    return result
