"""Teacher latent subspace learning: the student trainer behind compress() and the baselines.

`StudentTrainer` is a keras.Model whose train_step trains a student, so fit(), callbacks,
progress bars, TensorBoard, checkpoints and tf.distribute work as usual. Its loss is

    sum_l w_l * MSE(A_l(S_l(x)), T_l(x)) / scale_l          (latent subspace matching)
    + w_out * T^2 * KL(softmax(T(x)/T) || softmax(S(x)/T))  (distillation of the outputs)
    + w_label * CE(S(x), y)                                  (labels: baselines only)
    + lambda * ChannelLasso(student)                         (LASSO, see regularizers)

where S_l, T_l are the student's and the frozen teacher's latents at tap l, A_l is a linear
1x1 adapter from the student's k channels to the teacher's n (dropped after training), and
scale_l is the teacher latent's mean square, so that every tap weighs alike.

With `proximal=True` (the default) the LASSO is applied by proximal gradient descent
(ISTA): the variables LASSO measures (BN gammas, or filters without a BN after them) take a
plain SGD step of their own, then a soft-threshold of lasso_learning_rate * lambda, which
sets whole channels to exact zeros. Plain SGD matters: an adaptive optimizer such as Adam
rescales every coordinate's step to about its learning rate, so a fixed threshold would
then shrink every channel alike instead of the ones the loss needs least. Every other
variable trains with the compiled optimizer. Each layer's SGD step is bounded to
`lasso_max_step` of its weights' norm (a trust ratio: filters without a BatchNormalization
after them, such as squeeze-and-excitation convolutions, can have gradients large enough
to diverge). With `proximal=False` the LASSO is a loss term.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfsubspace import keras_private
from tfsubspace.distill.lasso import ChannelLasso
from tfsubspace.train.fitloop import fit_resumable


def _adapter(rank: int, teacher_channels: int, name: str):
    if rank == 4:
        return keras.layers.Conv2D(teacher_channels, 1, name=name)
    if rank == 3:
        return keras.layers.Conv1D(teacher_channels, 1, name=name)
    return keras.layers.Dense(teacher_channels, name=name)


def _is_softmax(function) -> bool:
    return function is keras.activations.softmax or getattr(function, "__name__", "") == "softmax"


class _WithoutActivation(keras.layers.Layer):
    """Calls a layer with its activation replaced by the identity, sharing its variables."""

    def __init__(self, layer, **kwargs):
        super().__init__(name=f"{layer.name}_logits", **kwargs)
        self.layer = layer

    def call(self, x):
        activation = self.layer.activation
        self.layer.activation = keras.activations.linear
        try:
            return self.layer.call(x)
        finally:
            self.layer.activation = activation


def _softmax_ending(model: keras.Model):
    """(layer, its input tensors, whether the softmax is the layer's activation) when
    `model`'s output is a softmax; None otherwise."""
    made_by = keras_private.producer(model.outputs[0])
    if made_by is None:
        return None
    layer, node_index = made_by
    inputs = keras_private.inbound_nodes(layer)[node_index].input_tensors
    if isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and _is_softmax(layer.activation)
    ):
        return layer, inputs, False
    if _is_softmax(getattr(layer, "activation", None)) and len(inputs) == 1:
        return layer, inputs, True
    return None


def ends_in_softmax(model: keras.Model) -> bool:
    """Whether `model` hands out a softmax's probabilities (see logits_output)."""
    return _softmax_ending(model) is not None


def logits_output(model: keras.Model):
    """The tensor of `model`'s graph whose softmax is its output, or the output itself.

    A classifier that ends in a softmax (a Softmax or Activation layer, or a layer with
    activation="softmax") hands out probabilities; distilling those as if they were logits
    makes the distillation loss vanish. Its logits are the softmax's input, or the last
    layer's output computed without its activation.
    """
    ending = _softmax_ending(model)
    if ending is None:
        return model.outputs[0]
    layer, inputs, in_activation = ending
    return _WithoutActivation(layer)(inputs[0]) if in_activation else inputs[0]


class StudentTrainer(keras.Model):
    """Trains `student` against `teacher` (latents and outputs) and/or labels.

    Args:
        student: the model to train (its layers are trained in place).
        teacher: the frozen teacher, or None for label-only training.
        taps: layer names whose outputs are matched (same name in teacher and student).
        tap_weight: weight w_l of every tap's latent loss.
        tap_scales: per tap, the teacher latent's mean square (defaults to 1).
        stages: None to train all taps at once (end to end), or a list of lists of taps:
            stage s trains only its taps, the output distillation joins in the last stage
            (stage-wise, greedy). The StageSchedule callback moves through the stages.
        kd_weight, temperature: output distillation weight and temperature.
        label_weight: weight of the cross-entropy on labels (needs (x, y) batches).
        lasso, lasso_weight, proximal: the channel LASSO, its factor, and whether it is
            applied as a proximal step (exact zeros) or as a loss term.
        lasso_learning_rate: the SGD learning rate of the LASSO'd variables (proximal only).
        lasso_max_step: the most one SGD step may move a LASSO'd layer, relative to its
            weights' norm (None: unbounded).
        augment: a Keras layer that draws a random view of a batch of images
            (tfsubspace.distill.augment); teacher and student both see that view, drawn
            afresh at every step. Teacher-only training: labels would not follow a mixup.
    """

    def __init__(
        self,
        student,
        teacher=None,
        *,
        taps=(),
        tap_scales=None,
        stages=None,
        tap_weight: float = 1.0,
        kd_weight: float = 1.0,
        temperature: float = 4.0,
        label_weight: float = 0.0,
        lasso: ChannelLasso | None = None,
        lasso_weight: float = 0.0,
        proximal: bool = True,
        lasso_learning_rate: float = 0.01,
        lasso_max_step: float | None = 0.02,
        augment: keras.layers.Layer | None = None,
        **kwargs,
    ):
        super().__init__(name=kwargs.pop("name", "student_trainer"), **kwargs)
        if teacher is None and label_weight <= 0:
            raise ValueError("Without a teacher the student can only learn from labels: set label_weight > 0.")
        if teacher is None and taps:
            raise ValueError("Latent taps need a teacher.")
        if augment is not None and (teacher is None or label_weight > 0):
            raise ValueError(
                "augment is for training on a teacher alone: labels do not follow a mixed or cropped view."
            )
        self.augment = augment
        self.student = student
        self.teacher = teacher
        self.taps = list(taps)
        self.tap_weight = float(tap_weight)
        self.kd_weight = float(kd_weight) if teacher is not None else 0.0
        self.temperature = float(temperature)
        self.label_weight = float(label_weight)
        self.lasso = lasso
        self.lasso_weight = float(lasso_weight)
        self.proximal = proximal and lasso is not None and lasso_weight > 0
        self.lasso_learning_rate = float(lasso_learning_rate)
        self.lasso_max_step = None if lasso_max_step is None else float(lasso_max_step)
        self.lasso_optimizer = None
        if lasso is not None and hasattr(lasso, "targets"):
            self.lasso_targets = lasso.targets  # tracked: saved and restored with the checkpoints
        if self.proximal:
            self.lasso_optimizer = keras.optimizers.SGD(self.lasso_learning_rate, momentum=0.9)
            self.lasso_optimizer.build([v for v, _ in lasso.members])
        self.stages = stages
        tap_scales = tap_scales or {}
        self._scales = [float(tap_scales.get(t, 1.0)) for t in self.taps]
        # outputs matched as logits: a model's softmax (if it ends in one) is left out
        self.student_features = keras.Model(
            student.inputs, [student.get_layer(t).output for t in self.taps] + [logits_output(student)]
        )
        if teacher is not None:  # frozen by leaving it out of trainable_weights, not by mutating it
            self.teacher_features = keras.Model(
                teacher.inputs, [teacher.get_layer(t).output for t in self.taps] + [logits_output(teacher)]
            )
        self.adapters = []
        for tap in self.taps:
            s_shape = student.get_layer(tap).output.shape
            n = teacher.get_layer(tap).output.shape[-1]
            adapter = _adapter(len(s_shape), n, name=f"adapter_{tap}")
            adapter.build(s_shape)
            self.adapters.append(adapter)
        initial = [self.tap_weight] * len(self.taps) + [self.kd_weight]
        if stages is not None:
            initial = self._stage_weights(0)
        self.loss_weights_var = keras.Variable(np.array(initial, "float32"), trainable=False, name="tap_weights")
        names = (
            ["loss"]
            + (["latent_loss"] if self.taps else [])
            + (["kd_loss"] if self.kd_weight else [])
            + (["label_loss"] if self.label_weight else [])
            + (["lasso"] if lasso is not None else [])
        )
        self._trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy") if self.label_weight else None
        self._agreement = keras.metrics.Mean(name="agreement") if teacher is not None else None
        self.built = True  # every sub-layer is built above

    def fit_adapters(self, ds, batches: int = 20, ridge: float = 1e-4) -> None:
        """Sets every adapter to the least-squares linear map (with bias) from the student's
        latent to the teacher's, over `batches` batches of `ds` (every pixel a sample).

        Training then starts from the best linear reconstruction of the teacher's latents
        rather than from a random map, whose gradients would first wreck the student.
        """
        if not self.adapters or self.teacher is None:
            return
        grams = [None] * len(self.adapters)
        crosses = [None] * len(self.adapters)
        for batch in ds.take(batches):
            x, _ = self._split(batch)
            s_out = self._features(self.student_features, x)
            t_out = self._features(self.teacher_features, x)
            for i in range(len(self.adapters)):
                s = keras.ops.convert_to_numpy(s_out[i]).astype(np.float64)
                t = keras.ops.convert_to_numpy(t_out[i]).astype(np.float64)
                s = np.concatenate([s.reshape(-1, s.shape[-1]), np.ones((s.size // s.shape[-1], 1))], axis=1)
                t = t.reshape(-1, t.shape[-1])
                grams[i] = s.T @ s + (grams[i] if grams[i] is not None else 0.0)
                crosses[i] = s.T @ t + (crosses[i] if crosses[i] is not None else 0.0)
        for adapter, gram, cross in zip(self.adapters, grams, crosses):
            if gram is None:
                return
            reg = ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
            solution = np.linalg.solve(gram + reg, cross)
            adapter.kernel.assign(solution[:-1].reshape(adapter.kernel.shape).astype("float32"))
            adapter.bias.assign(solution[-1].astype("float32"))

    # ------------------------------------------------------------ stages

    def _stage_weights(self, stage: int) -> list[float]:
        active = set(self.stages[stage])
        last = stage == len(self.stages) - 1
        return [self.tap_weight if t in active else 0.0 for t in self.taps] + [self.kd_weight if last else 0.0]

    def set_stage(self, stage: int) -> None:
        self.stage = stage
        self.loss_weights_var.assign(np.array(self._stage_weights(stage), "float32"))

    def trained_taps(self) -> list[str]:
        """The taps trained so far: every tap end to end; the current and earlier stages' stage-wise."""
        if self.stages is None:
            return list(self.taps)
        return [t for s in self.stages[: getattr(self, "stage", 0) + 1] for t in s]

    # ------------------------------------------------------------ training

    @property
    def trainable_weights(self):
        """The student's and the adapters' trainable weights; never the teacher's."""
        return self.student.trainable_weights + [w for a in self.adapters for w in a.trainable_weights]

    @property
    def trainable_variables(self):
        return self.trainable_weights

    def build_optimizers(self) -> None:
        """Creates the compiled optimizer's variables for exactly the variables it trains (with
        a proximal LASSO, not the LASSO'd ones: lasso_optimizer has those), as the first
        training step would; EpochCheckpoint.restore then loads a saved state into them."""
        variables = self.trainable_variables
        if self.proximal:
            lassoed = {id(v) for v, _ in self.lasso.members}
            variables = [v for v in variables if id(v) not in lassoed]
        self.optimizer.build(variables)

    def _bounded(self, pairs):
        """The LASSO'd variables' gradients, each layer's scaled down where needed so that its
        SGD step moves it by at most `lasso_max_step` of its norm (a trust ratio, as LARS
        bounds steps). Plain SGD on raw filters (layers without a BatchNormalization after
        them, such as squeeze-and-excitation convolutions) otherwise diverges where their
        gradients are large; where they are not, this changes nothing."""
        if self.lasso_max_step is None:
            return pairs
        layers: dict[str, list[int]] = {}
        for i, (_, v) in enumerate(pairs):
            layers.setdefault(v.path.rsplit("/", 1)[0], []).append(i)
        out = list(pairs)
        for members in layers.values():
            weight_norm = ops.sqrt(sum(ops.sum(ops.square(pairs[i][1])) for i in members))
            grad_norm = ops.sqrt(sum(ops.sum(ops.square(pairs[i][0])) for i in members))
            step = self.lasso_learning_rate * grad_norm
            factor = ops.minimum(1.0, self.lasso_max_step * weight_norm / ops.maximum(step, 1e-30))
            for i in members:
                out[i] = (pairs[i][0] * factor, pairs[i][1])
        return out

    def call(self, x, training=False):
        return self.student(x, training=training)

    @property
    def metrics(self):
        return [m for m in (*self._trackers.values(), self._accuracy, self._agreement) if m is not None]

    @staticmethod
    def _features(model, x, training=False) -> list:
        out = model(x, training=training)
        return list(out) if isinstance(out, (list, tuple)) else [out]  # one output comes alone

    @staticmethod
    def _split(data):
        if isinstance(data, (tuple, list)):
            return data[0], (data[1] if len(data) > 1 else None)
        return data, None

    def _loss_terms(self, s_out, t_out, y):
        weights = self.loss_weights_var
        logits = s_out[-1]
        latent = ops.convert_to_tensor(0.0)
        for i, (adapter, scale) in enumerate(zip(self.adapters, self._scales)):
            err = ops.mean(ops.square(adapter(s_out[i]) - t_out[i])) / scale
            latent = latent + weights[i] * err
        kd = ops.convert_to_tensor(0.0)
        if t_out is not None and self.kd_weight > 0:
            t = self.temperature
            p_teacher = ops.softmax(t_out[-1] / t)
            log_ratio = ops.log_softmax(t_out[-1] / t) - ops.log_softmax(logits / t)
            kd = weights[-1] * t * t * ops.mean(ops.sum(p_teacher * log_ratio, axis=-1))
        label = ops.convert_to_tensor(0.0)
        if self.label_weight > 0:
            label = self.label_weight * ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )
        return latent, kd, label

    def train_step(self, data):
        x, y = self._split(data)
        if self.label_weight > 0 and y is None:
            raise ValueError("label_weight > 0 needs (images, labels) batches.")
        if self.augment is not None:  # one view for both: the student learns the teacher's function on it
            x = self.augment(x, training=True)
        t_out = self._features(self.teacher_features, x) if self.teacher is not None else None
        with tf.GradientTape() as tape:
            s_out = self._features(self.student_features, x, training=True)
            latent, kd, label = self._loss_terms(s_out, t_out, y)
            total = latent + kd + label
            penalty = self.lasso.penalty() if self.lasso is not None else ops.convert_to_tensor(0.0)
            objective = total if (self.proximal or self.lasso is None) else total + self.lasso_weight * penalty
            # optimizers sum the replicas' gradients: each replica contributes its share of the mean
            objective = objective / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.trainable_variables
        grads = tape.gradient(objective, variables)
        if self.proximal:
            lassoed = {id(v) for v, _ in self.lasso.members}
            pairs = list(zip(grads, variables))
            self.optimizer.apply_gradients([(g, v) for g, v in pairs if id(v) not in lassoed])
            self.lasso_optimizer.apply_gradients(self._bounded([(g, v) for g, v in pairs if id(v) in lassoed]))
            self.lasso.proximal(self.lasso_learning_rate * self.lasso_weight)
        else:
            self.optimizer.apply_gradients(zip(grads, variables))
        self._update(total, latent, kd, label, penalty, s_out[-1], t_out, y)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = self._split(data)
        t_out = self._features(self.teacher_features, x) if self.teacher is not None else None
        s_out = self._features(self.student_features, x)
        latent, kd, label = self._loss_terms(s_out, t_out, y if self.label_weight > 0 else None)
        penalty = self.lasso.penalty() if self.lasso is not None else ops.convert_to_tensor(0.0)
        self._update(latent + kd + label, latent, kd, label, penalty, s_out[-1], t_out, y)
        return {m.name: m.result() for m in self.metrics}

    def _update(self, total, latent, kd, label, penalty, logits, t_out, y):
        for name, value in (
            ("loss", total),
            ("latent_loss", latent),
            ("kd_loss", kd),
            ("label_loss", label),
            ("lasso", penalty),
        ):
            if name in self._trackers:
                self._trackers[name].update_state(value)
        if y is not None and self._accuracy is not None:
            self._accuracy.update_state(y, logits)
        if t_out is not None:
            same = ops.equal(ops.argmax(logits, axis=-1), ops.argmax(t_out[-1], axis=-1))
            self._agreement.update_state(ops.cast(same, "float32"))


class StageSchedule(keras.callbacks.Callback):
    """Moves a stage-wise StudentTrainer through its stages, spread evenly over the epochs."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        stages = len(self.model.stages)
        self.model.set_stage(min(stages - 1, epoch * stages // self.epochs))


def stage_split(taps: list[str], stages: int) -> list[list[str]]:
    """Splits taps (in graph order) into `stages` consecutive chunks (fewer if few taps)."""
    stages = max(1, min(stages, len(taps)))
    bounds = np.linspace(0, len(taps), stages + 1).round().astype(int)
    return [taps[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def train_student(
    trainer: StudentTrainer,
    ds,
    *,
    epochs: int,
    learning_rate: float,
    work_dir,
    name: str,
    verbose="auto",
    tensorboard_dir=None,
    callbacks=(),
    log_callbacks=(),
    strategy=None,
    steps_per_epoch: int | None = None,
) -> keras.callbacks.History:
    """Fits `trainer` on `ds` with Adam (cosine decay over every step), resumably.

    tfsubspace.train.fitloop.fit_resumable runs it: the state after each epoch goes to
    work_dir/NAME_backup and the metrics to work_dir/NAME.csv (and to TensorBoard under
    tensorboard_dir/NAME when given); a rerun continues after the last finished epoch; a NaN
    or infinite loss stops the run with a FloatingPointError naming the epoch and batch.
    Under a `strategy` (tfsubspace.train.distribute), build `trainer` in its scope; `ds` holds global
    batches.
    """
    work_dir = Path(work_dir)

    def compile(total_steps):
        trainer.compile(
            optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, total_steps))
        )

    extra = [StageSchedule(epochs)] if trainer.stages is not None else []  # before callbacks following the stage
    return fit_resumable(
        trainer,
        ds,
        epochs=epochs,
        compile=compile,
        backup_dir=work_dir / f"{name}_backup",
        csv_path=work_dir / f"{name}.csv",
        name=name,
        steps_per_epoch=steps_per_epoch,
        callbacks=[*extra, *callbacks],
        log_callbacks=log_callbacks,
        verbose=verbose,
        tensorboard_dir=tensorboard_dir,
        strategy=strategy,
    )
