"""tf.distribute for every training loop: the strategy by name, who writes, and fit().

- `get_strategy(name)`: "default" (one device), "mirrored" (MirroredStrategy: the devices of
  one host) or "multi_worker" (MultiWorkerMirroredStrategy: several hosts, from TF_CONFIG).
  Build models and optimizers under `strategy.scope()`; batch sizes are global; data sets
  are sharded by the strategy.
- `is_chief(strategy)`: the one worker that writes checkpoints and outputs; the others
  compute the same steps and write to a private temporary directory (`private_work_dir`).
- `fit(model, ds, ...)`: model.fit(), except under MultiWorkerMirroredStrategy, which Keras 3's
  fit() does not run (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)"):
  there, the same train_step runs in a loop of our own through strategy.run, with the same
  callbacks. A worker that stops answering ends the run with a WorkerLostError on the others
  (collectives and the workers' heartbeats time out after `timeout_s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError

STRATEGIES = ("default", "mirrored", "multi_worker")


class WorkerLostError(TfSubspaceError):
    """A worker of a multi-worker run died or stopped answering."""


def get_strategy(name: str = "default", *, timeout_s: float = 300.0):
    """The tf.distribute strategy called `name` (see STRATEGIES)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise TfSubspaceError(
                "strategy 'multi_worker' needs TF_CONFIG (the cluster and this worker's task), e.g. "
                '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        try:
            config = json.loads(raw)
            workers = config["cluster"]["worker"]
            task = config["task"]
            if task["type"] not in ("worker", "chief") or not workers:
                raise ValueError("task type must be worker or chief")
        except (ValueError, KeyError, TypeError) as e:
            raise TfSubspaceError(f"TF_CONFIG is not a valid cluster description ({e}): {raw}") from None
        _patient_heartbeats(config["cluster"], timeout_s)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise ValueError(f"Unknown strategy {name!r}; expected one of {STRATEGIES}.")


def _patient_heartbeats(cluster: dict, timeout_s: float) -> None:
    """Sets the coordination service's heartbeat timeout to `timeout_s` before the strategy
    starts it. MultiWorkerMirroredStrategy leaves it at TensorFlow's default (10 s), so a worker
    that a loaded machine does not schedule for 10 s is declared dead and every other worker's
    run ends. The strategy configures the service only where nothing has, in the same way
    (TensorFlow has no public setter for it)."""
    from tensorflow.python.eager import context

    ctx = context.context()
    if ctx.coordination_service is not None or not hasattr(ctx, "configure_coordination_service"):
        return
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util

    jobs = [name for name in ("chief", "worker") if cluster.get(name)]
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        heartbeat_timeout_in_ms=int(timeout_s * 1000),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=name, num_tasks=len(cluster[name])) for name in jobs
        ],
    )


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy=None) -> bool:
    """True unless this is a non-chief worker of a multi-worker run (worker 0 is the chief
    when the cluster names none)."""
    if strategy is None or not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


@contextlib.contextmanager
def private_work_dir(work_dir, strategy=None):
    """`work_dir` on the chief; on other workers a temporary copy of it (so they resume from
    the chief's checkpoints), removed afterwards: only the chief's writes last. The copy leaves
    out the files the chief is writing at that moment (fileio.TEMPORARY): a copy made while the
    chief writes its manifest would otherwise hold a stage file and no manifest, which the
    worker's claim refuses."""
    if is_chief(strategy):
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="tfsubspace-worker-") as tmp:
        if Path(work_dir).exists():
            shutil.copytree(work_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(fileio.TEMPORARY))
        yield Path(tmp)


def clone_in_scope(model: keras.Model, strategy) -> keras.Model:
    """A copy of `model` (same weights) whose variables live under `strategy`."""
    with strategy.scope():
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    return copy


def skip_passes(ds, passes: int) -> None:
    """Advances the tf.data.Dataset `ds` by `passes` passes without reading it.

    A seeded shuffle draws a new order for each pass over a data set (each iterator made from
    it or from a data set built on it), and the n-th order is the same in every process: a
    resumed run that skips the passes its killed predecessor made gets the orders that run
    would have had next.
    """
    for _ in range(passes):
        iter(ds)


_PASSES_PER_EPOCH: dict = {}


def passes_per_epoch(strategy=None) -> int:
    """How many passes over its data set one epoch of fit() makes under `strategy`.

    Keras's fit() may make more than one iterator per epoch (two in Keras 3.x; under
    MirroredStrategy one more per fit() call, before the first epoch); this measures it once
    per process and strategy type, as the difference between a one- and a two-epoch fit on a
    tiny seeded data set. The multi-worker loop below makes one.
    """
    if strategy is not None and is_multi_worker(strategy):
        return 1  # _multi_worker_fit: one iterator of the distributed data set per epoch
    key = type(strategy).__name__
    if key not in _PASSES_PER_EPOCH:
        import tensorflow as tf

        def make():
            x = tf.data.Dataset.range(64).map(lambda i: tf.cast(tf.reshape(i, (1,)), "float32"))
            return tf.data.Dataset.zip(x, x).shuffle(64, seed=0).batch(64)

        reference = make()
        orders = [next(iter(reference))[0].numpy().tobytes() for _ in range(16)]
        passes = []
        for epochs in (1, 2):
            ds = make()
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                probe = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
                probe.compile("sgd", "mse")
            probe.fit(ds, epochs=epochs, verbose=0, shuffle=False)
            passes.append(orders.index(next(iter(ds))[0].numpy().tobytes()))
        _PASSES_PER_EPOCH[key] = passes[1] - passes[0]
    return _PASSES_PER_EPOCH[key]


def fit(
    model: keras.Model,
    ds,
    *,
    epochs: int,
    initial_epoch: int = 0,
    callbacks=(),
    verbose="auto",
    strategy=None,
    validation_data=None,
) -> keras.callbacks.History:
    """model.fit(ds, ...) under `strategy` (compile the model in its scope first).

    Resumed at `initial_epoch` > 0, it first skips the passes over `ds` that the earlier
    epochs made, so that a seeded shuffle gives each epoch the order it has in a run that
    was never stopped.
    """
    if strategy is None or not is_multi_worker(strategy):
        skip_passes(ds, initial_epoch * passes_per_epoch(strategy))
        return model.fit(
            ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=list(callbacks),
            shuffle=False,
            verbose=verbose,
            validation_data=validation_data,
        )
    return _multi_worker_fit(model, ds, epochs, initial_epoch, list(callbacks), verbose, strategy)


def _multi_worker_fit(model, ds, epochs, initial_epoch, callbacks, verbose, strategy):
    import tensorflow as tf

    history = keras.callbacks.History()
    steps = int(ds.cardinality())
    callback_list = keras.callbacks.CallbackList(
        [*callbacks, history],
        add_progbar=verbose not in (0, "0"),
        model=model,
        epochs=epochs,
        steps=steps if steps > 0 else None,
        verbose=2 if verbose == "auto" else verbose,
    )
    distributed = strategy.experimental_distribute_dataset(ds)
    skip_passes(distributed, initial_epoch)  # one pass per epoch below, over the (re-sharded) copy

    @tf.function
    def step(batch):
        out = strategy.run(model.train_step, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in out.items()}

    model.stop_training = False
    logs = {}
    try:
        callback_list.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            for i, batch in enumerate(distributed):
                callback_list.on_train_batch_begin(i)
                logs = step(batch)
                callback_list.on_train_batch_end(i, logs)
            logs = {k: float(v) for k, v in logs.items()}
            callback_list.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        callback_list.on_train_end(logs)
    except (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.CancelledError,
        tf.errors.InternalError,
    ) as e:
        raise WorkerLostError(
            f"A worker of the multi-worker run stopped answering ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Restart every worker with the same command: the run resumes from the chief's last checkpoint."
        ) from None
    return history
