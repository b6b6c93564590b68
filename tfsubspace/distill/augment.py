"""Consistent teaching: the teacher and the student see the same augmented view of each image.

A student distilled on a few thousand unlabeled images matches its teacher on those images
and little else. Function matching (Beyer et al., "Knowledge distillation: A good teacher is
patient and consistent", CVPR 2022) draws a fresh view of every image at every step (a random
resized crop, a flip, a mixup of two images of the batch) and asks the student to agree with
the teacher on that view: the transfer set becomes as varied as the augmentations.

`augmenter(spec, input_shape, seed)` builds the view as a Keras layer whose random draws come
from seed generators, which the trainer's checkpoints save: a resumed run draws the views an
unbroken run would have drawn.

Spec: "auto" (mixup, and a flip for colour images), "none", or a comma-separated list of
  crop     a random resized crop: zoom in by up to 25% and shift by up to 10%
  flip     a horizontal flip (left off by "auto" for one-channel images: digits and letters
           are not mirror-symmetric)
  mixup    each image blended with another of the batch (Beta(0.2, 0.2) weights)
  cutmix   a box of each image replaced by the same box of another
"auto" leaves crops out: on images from the teacher's own domain they cost the student far
more than they gave it on images from another domain (benchmarks/README.md, "Few unlabeled
images"); pass "crop,mixup" when the images come from elsewhere.
"""

from __future__ import annotations

import keras

AUGMENTATIONS = ("crop", "flip", "mixup", "cutmix")


def parse(spec: str, input_shape) -> tuple[str, ...]:
    """The augmentations `spec` names, for images of `input_shape` (H, W, C)."""
    if not isinstance(spec, str):
        raise ValueError(
            f"augment must be 'auto', 'none' or a comma-separated list of {AUGMENTATIONS}. Received: augment={spec!r}"
        )
    spec = spec.strip().lower()
    if spec == "none" or spec == "":
        return ()
    if spec == "auto":
        if len(input_shape) != 3 or min(input_shape[:2]) < 8:
            return ()  # not an image a crop or flip makes sense on
        return ("mixup",) if input_shape[-1] == 1 else ("flip", "mixup")
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"augment: unknown augmentation {unknown[0]!r}; expected 'auto', 'none' or a comma-separated "
            f"list of {AUGMENTATIONS}. Received: augment={spec!r}"
        )
    if len(input_shape) != 3:
        raise ValueError(f"augment={spec!r} needs images (H, W, C); the model takes {tuple(input_shape)}.")
    return names


def augmenter(spec: str, input_shape, seed: int = 0) -> keras.Sequential | None:
    """The augmentation layer of `spec` for images of `input_shape`, or None when it is empty."""
    names = parse(spec, input_shape)
    if not names:
        return None
    layers = []
    for i, name in enumerate(names):
        s = seed + 101 * (i + 1)
        if name == "crop":
            layers += [
                keras.layers.RandomZoom((-0.25, 0.0), fill_mode="reflect", seed=s),
                keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=s + 1),
            ]
        elif name == "flip":
            layers.append(keras.layers.RandomFlip("horizontal", seed=s))
        elif name == "mixup":
            layers.append(keras.layers.MixUp(alpha=0.2, seed=s))
        elif name == "cutmix":
            layers.append(keras.layers.CutMix(seed=s))
    return keras.Sequential(layers, name="consistent_view")
