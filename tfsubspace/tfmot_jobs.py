"""TFMOT jobs on rebuilt tf_keras models: quantization-aware training and magnitude pruning.

These run in their own process, in an environment with the `tfmot` extra (`make tfmot`):
importing TFMOT switches tf.keras to tf_keras for the whole process. The models arrive as
layer specs (tfsubspace.bridge.save_spec); the main process calls them through
scripts/qat.py (tfsubspace.export.export_qat) and benchmarks/tfmot_prune.py.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tfsubspace import fileio


def _distillation_loss(temperature: float):
    import tensorflow as tf

    def loss(teacher_logits, student_logits):
        p = tf.nn.softmax(teacher_logits / temperature)
        log_ratio = tf.nn.log_softmax(teacher_logits / temperature) - tf.nn.log_softmax(student_logits / temperature)
        return temperature ** 2 * tf.reduce_sum(p * log_ratio, axis=-1)

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

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def quantization_aware_training(student_spec, teacher_spec, ds, out_path: str | os.PathLike, *, epochs: int = 2,
                                learning_rate: float = 1e-4, temperature: float = 4.0, verbose="auto") -> Path:
    """Fine-tunes the student with fake quantization against the teacher's softened outputs
    (no labels), then writes it as a full-int8 .tflite (int8 input and output)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from tfsubspace.bridge import build_tf_keras

    student = build_tf_keras(student_spec)
    teacher = build_tf_keras(teacher_spec)
    teacher.trainable = False
    quantized = tfmot.quantization.keras.quantize_model(student)
    quantized.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss=_distillation_loss(temperature))
    pairs = _images(ds).map(lambda x: (x, teacher(x, training=False)))
    quantized.fit(pairs, epochs=epochs, verbose=verbose)
    return fileio.write_bytes(out_path, _int8_tflite(quantized, ds))


def magnitude_pruning(model_spec, labeled_ds, test_ds, out_dir: str | os.PathLike, *, sparsity: float, epochs: int,
                      learning_rate: float = 3e-4, verbose="auto") -> dict:
    """TFMOT's low-magnitude pruning (Zhu & Gupta's polynomial schedule to `sparsity` over the
    first two thirds of the steps) with fine-tuning on labels; writes the stripped model as
    float32 and int8 .tflite and returns its test accuracy and sizes (raw and gzip-compressed)."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from tfsubspace.bridge import build_tf_keras

    model = build_tf_keras(model_spec)
    steps = int(labeled_ds.cardinality()) * epochs
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=max(1, 2 * steps // 3),
                                                    frequency=max(1, steps // 100))
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(optimizer=tf_keras.optimizers.Adam(learning_rate),
                   loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    pruned.fit(labeled_ds, epochs=epochs, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=verbose)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.compile(loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    accuracy = float(stripped.evaluate(test_ds, verbose=0)[1])
    kernels = [w for layer in stripped.layers for w in layer.get_weights()[:1] if w.ndim > 1]
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / max(1, sum(k.size for k in kernels))
    nonzero = sum(int(np.count_nonzero(w)) for w in stripped.get_weights())
    out_dir = Path(out_dir)
    float32 = tf.lite.TFLiteConverter.from_keras_model(stripped).convert()
    fileio.write_bytes(out_dir / "float32.tflite", float32)
    int8 = _int8_tflite(stripped, labeled_ds)
    fileio.write_bytes(out_dir / "int8.tflite", int8)
    result = {"accuracy": accuracy, "kernel_sparsity": zeros, "sparsity_target": sparsity, "epochs": epochs,
              "params": int(stripped.count_params()), "nonzero_params": nonzero,
              "float32_bytes": len(float32), "float32_gzip_bytes": len(gzip.compress(float32, 9)),
              "int8_bytes": len(int8), "int8_gzip_bytes": len(gzip.compress(int8, 9))}
    fileio.write_json(out_dir / "result.json", result)
    return result
