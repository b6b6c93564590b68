"""What compress() accepts as data, checked before any training starts.

`image_dataset(data, model, name)` takes what `model.fit` takes (a tf.data.Dataset of images,
(images, labels) or (images, labels, weights); a NumPy array of images; an (images, labels)
tuple of arrays) and returns a batched tf.data.Dataset of float32 images (labels kept where
given, for reports), or raises a DataError that names the argument and says what is wrong.
Values are not rescaled: the model sees the range the data holds (0-255 stays 0-255).

`scan(ds, name)` makes one pass over a data set: it counts the batches of one epoch (a
filtered or generated data set does not know its length, and a learning-rate schedule over
"epochs" steps would then end after the first epoch), refuses an empty one and one whose
images hold NaN or infinite values (naming the batch), and fingerprints the images for the
work directory's manifest. The returned data set then declares its length.
"""

from __future__ import annotations

import dataclasses
import hashlib

import keras
import numpy as np

from tfsubspace.errors import DataError, UnsupportedModelError
from tfsubspace.prune.graph import functional_view

DEFAULT_BATCH_SIZE = 32


def images_of(batch):
    """The images of a batch that may be images alone or (images, labels[, weights])."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def check_model(model) -> None:
    """Refuses what compress() does not support, before anything runs: one image input and
    one output, float32 variables."""
    functional_view(model)  # a graph to analyse: not subclassed, input shape known
    if len(model.inputs or []) != 1:
        raise UnsupportedModelError(
            f"Model {model.name!r} has {len(model.inputs or [])} inputs; tfsubspace compresses models with one "
            "image input (wrap the others as constants, or split the model)."
        )
    if len(model.outputs or []) != 1:
        raise UnsupportedModelError(
            f"Model {model.name!r} has {len(model.outputs)} outputs; tfsubspace compresses classifiers with one "
            "output (build a model that returns the one to keep)."
        )
    policy = getattr(model, "dtype_policy", None)
    mixed = [
        layer.name
        for layer in model.layers
        if getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") != "float32"
    ]
    if mixed or (policy is not None and policy.compute_dtype != "float32"):
        raise UnsupportedModelError(
            f"Model {model.name!r} computes in {mixed and 'another dtype in layer ' + repr(mixed[0]) or policy.name}; "
            "tfsubspace trains and exports float32 models. Rebuild it under "
            "keras.mixed_precision.set_dtype_policy('float32') and load its weights."
        )


def image_dataset(data, model: keras.Model, name: str, *, batch_size: int = DEFAULT_BATCH_SIZE):
    """`data` as a batched tf.data.Dataset of float32 images (or (images, labels)) that fit
    `model`'s input; `name` is the argument's name in error messages."""
    import tensorflow as tf

    if isinstance(data, np.ndarray):
        data = tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
    elif isinstance(data, tuple) and data and all(isinstance(a, np.ndarray) for a in data):
        if len({len(a) for a in data}) != 1:
            raise DataError(f"{name}: the arrays of the tuple differ in length ({[len(a) for a in data]}).")
        data = tf.data.Dataset.from_tensor_slices(data[:2]).batch(batch_size)
    elif not isinstance(data, tf.data.Dataset):
        raise TypeError(
            f"{name} must be a tf.data.Dataset, a NumPy array of images or an (images, labels) tuple of "
            f"arrays. Received: {type(data).__name__}"
        )
    spec = data.element_spec
    if isinstance(spec, dict) or (isinstance(spec, tuple) and spec and isinstance(spec[0], dict)):
        raise DataError(
            f"{name} yields dicts; pass images, or (images, labels) tuples (e.g. "
            f"ds.map(lambda d: (d['image'], d['label'])))."
        )
    if isinstance(spec, tuple):
        if not 1 <= len(spec) <= 3 or not all(isinstance(s, tf.TensorSpec) for s in spec):
            raise DataError(f"{name} yields {spec}; pass images, (images, labels) or (images, labels, weights).")
        image_spec = spec[0]
    elif isinstance(spec, tf.TensorSpec):
        image_spec = spec
    else:
        raise DataError(f"{name} yields {spec}; pass images, or (images, labels) tuples.")
    expected = tuple(model.inputs[0].shape)
    rank = len(image_spec.shape)
    if rank == len(expected) - 1:
        data, image_spec = data.batch(batch_size), tf.TensorSpec((None, *image_spec.shape), image_spec.dtype)
        rank += 1
    got = tuple(image_spec.shape)
    if rank != len(expected) or any(e is not None and g is not None and e != g for e, g in zip(expected[1:], got[1:])):
        raise DataError(
            f"{name} yields images of shape {got}, but model {model.name!r} takes {expected}; pass a "
            "batched data set of matching images (resize, or add the channel axis)."
        )
    if not (image_spec.dtype.is_floating or image_spec.dtype.is_integer):
        raise DataError(f"{name} yields images of dtype {image_spec.dtype.name}; pass numbers (float or integer).")

    def to_float(x, *rest):
        x = tf.cast(x, tf.float32)
        return (x, rest[0]) if rest else x

    return data.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)


def one_epoch(ds, name: str, steps_per_epoch: int | None = None):
    """The batches of one epoch: `ds` cut to `steps_per_epoch` when given (each epoch starts
    the data set again); an infinite data set (`.repeat()`) without it is refused."""
    import tensorflow as tf

    if steps_per_epoch is not None:
        return ds.take(steps_per_epoch)
    if int(ds.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise DataError(f"{name} is infinite (it repeats); pass steps_per_epoch, or drop the .repeat().")
    return ds


@dataclasses.dataclass(frozen=True)
class Scan:
    """What one pass over a data set found."""

    steps: int  # batches of one epoch
    examples: int
    fingerprint: str  # of the images, whatever their order
    value_range: tuple[float, float]

    def describe(self) -> str:
        return (
            f"{self.steps} batches ({self.examples} images, values {self.value_range[0]:g} to {self.value_range[1]:g})"
        )


def scan(ds, name: str, *, steps_per_epoch: int | None = None):
    """One pass over `ds` (see the module docstring). Returns (ds of known length, Scan).

    With `steps_per_epoch`, an epoch is that many batches (`ds.take(steps_per_epoch)`: each
    epoch starts the data set again); an infinite data set (`.repeat()`) needs it.
    """
    import tensorflow as tf

    ds = one_epoch(ds, name, steps_per_epoch)
    cardinality = int(ds.cardinality())
    total, examples, low, high = 0, 0, np.inf, -np.inf
    steps = 0
    for steps, batch in enumerate(ds, start=1):
        x = np.asarray(images_of(batch))
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise DataError(
                f"{name}: batch {steps} (image {bad} of it) holds NaN or infinite values; pass finite images."
            )
        examples += len(x)
        low, high = min(low, float(x.min(initial=np.inf))), max(high, float(x.max(initial=-np.inf)))
        flat = np.ascontiguousarray(x.reshape(len(x), -1))
        for row in flat:  # a sum of per-image hashes does not depend on the order of the images
            total = (total + int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")) % 2**64
    if steps == 0 or examples == 0:
        raise DataError(f"{name} is empty; pass at least one batch of images.")
    if steps_per_epoch is not None and steps < steps_per_epoch:
        raise DataError(f"{name} ends after {steps} batches, fewer than steps_per_epoch={steps_per_epoch}.")
    if cardinality != steps:
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds, Scan(steps, examples, f"{total:016x}", (low, high))


def _one_hot(y: np.ndarray, classes: int) -> bool:
    """Whether labels are rows of one value per class (one-hot or probabilities)."""
    return y.ndim == 2 and y.shape[1] == classes and classes > 1


def labels_to_sparse(y, classes: int) -> np.ndarray:
    """Class indices from sparse labels (N,) / (N, 1) or one-hot / probability labels (N, classes)."""
    y = np.asarray(y)
    if _one_hot(y, classes):
        return np.argmax(y, axis=-1)
    return y.reshape(len(y), -1)[:, 0].astype(np.int64) if y.ndim > 1 else y.astype(np.int64)


def check_labels(ds, name: str, classes: int) -> None:
    """Checks the labels of an evaluation data set on its first batch: sparse class indices
    in [0, classes), or one-hot rows of length `classes`."""
    spec = ds.element_spec
    if not isinstance(spec, tuple):
        return  # images only: agreement with the teacher, no accuracy
    batch = next(iter(ds), None)
    if batch is None:
        raise DataError(f"{name} is empty; pass at least one batch.")
    y = np.asarray(batch[1])
    if _one_hot(y, classes):
        return
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise DataError(
            f"{name}: labels of shape {y.shape[1:]} fit neither sparse labels nor one-hot rows of {classes} classes."
        )
    flat = y.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer) and not np.all(flat == np.round(flat)):
        raise DataError(f"{name}: labels {flat[:4]} are not class indices.")
    if flat.size and (flat.min() < 0 or flat.max() >= classes):
        raise DataError(
            f"{name}: label {int(flat.max() if flat.max() >= classes else flat.min())} is outside the "
            f"model's {classes} classes."
        )


def split_holdout(ds, share: float, *, max_images: int = 2048, examples: int | None = None):
    """(training ds, held-out images): about `share` of the images set aside, chosen by a hash
    of their values, so the same images are held out whatever the order of `ds` and in every
    run; the rest, rebatched, train. The held-out images (at most `max_images`) come back as
    one NumPy array, read in one pass. With `examples` (the images in ds), the share is lowered
    so that about max_images fall aside rather than more images than are measured. Returns
    (ds, None) when `share` is 0 or nothing falls aside.
    """
    import tensorflow as tf

    if examples:
        share = min(share, max_images / examples)
    if share <= 0:
        return ds, None
    first = next(iter(ds))
    batch_size = int(np.shape(images_of(first))[0])
    buckets = 1000
    cut = max(1, int(round(share * buckets)))

    def bucket(x, *rest):
        return tf.strings.to_hash_bucket_fast(tf.io.serialize_tensor(x), buckets)

    images = ds.unbatch()
    held = [np.asarray(images_of(x)) for x in images.filter(lambda x, *r: bucket(x) < cut).take(max_images)]
    if not held:
        return ds, None
    train = images.filter(lambda x, *r: bucket(x) >= cut).batch(batch_size)
    return train, np.stack(held)
