"""The benchmark suites: which teachers, on which data sets, at which budgets. One place for
benchmarks/teachers.py (which trains the teachers) and benchmarks/compare.py (which compresses
them), so the two always agree on names and files (TEACHERS_DIR/{teacher}_{dataset}.keras).

- cpu: VGG-16 at width 0.25 and WRN-16-4 on MNIST and Fashion-MNIST, 81% and 90% of the
  parameters removed; finishes in a few hours on 2 cores. Every method trains WRN-16-4's
  students on the first 10,000 training images: on all 60,000 that half alone takes about a
  day there. The teachers train on everything.
- gpu: full width (VGG-16, WRN-28-10) on every data set tensorflow-datasets can load here
  (the others are skipped), three budgets. Its teacher epochs are a starting point: it has not
  been run yet.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Teacher:
    name: str  # files are {name}_{dataset}.keras
    model: str  # a tfsubspace.models.build name
    options: dict
    epochs: int
    augment: bool = False

    def key(self, dataset: str) -> str:
        return f"{self.name}_{dataset}"


@dataclass(frozen=True)
class Suite:
    teachers: tuple[Teacher, ...]
    datasets: tuple[str, ...]
    budgets: tuple[str, ...]
    train_limits: dict = field(default_factory=dict)  # per teacher name: training images per method

    def teacher(self, name: str) -> Teacher:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"No teacher {name!r} in this suite; it has {', '.join(t.name for t in self.teachers)}.")


SUITES = {
    "cpu": Suite(
        teachers=(
            Teacher("vgg16_w0.25", "vgg16", {"width": 0.25}, epochs=15),
            Teacher("wrn_16_4", "wrn", {"depth": 16, "widen_factor": 4}, epochs=3),
        ),
        datasets=("mnist", "fashion_mnist"),
        budgets=("0.81", "0.9"),
        train_limits={"wrn_16_4": 10000},
    ),
    "gpu": Suite(
        teachers=(
            Teacher("vgg16_w1.0", "vgg16", {"width": 1.0}, epochs=60, augment=True),
            Teacher("wrn_28_10", "wrn", {"depth": 28, "widen_factor": 10}, epochs=30, augment=True),
        ),
        datasets=("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"),
        budgets=("0.81", "0.9", "0.95"),
    ),
}
