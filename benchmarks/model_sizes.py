"""The reference models' parameter and MAC counts (tfsubspace.models.stats), as a Markdown table.

python benchmarks/model_sizes.py   # writes benchmarks/results/models.md
"""

from absl import app, flags

_OUT = flags.DEFINE_string("output", "benchmarks/results/models.md", "Markdown file to write.")

CASES = (
    ("LeNet-5", "lenet5", {}, (28, 28, 1), 10),
    ("VGG-16 width 0.25", "vgg16", {"width": 0.25}, (28, 28, 1), 10),
    ("VGG-16 width 1.0", "vgg16", {"width": 1.0}, (32, 32, 3), 10),
    ("WRN-16-4", "wrn", {"depth": 16, "widen_factor": 4}, (28, 28, 1), 10),
    ("WRN-16-4", "wrn", {"depth": 16, "widen_factor": 4}, (32, 32, 3), 10),
    ("WRN-28-10", "wrn", {"depth": 28, "widen_factor": 10}, (32, 32, 3), 10),
)


def main(argv):
    del argv
    from tfsubspace import fileio, models
    from tfsubspace.models import stats

    lines = ["| model | input | classes | params | MACs / image |", "|---|---|---:|---:|---:|"]
    for label, name, options, shape, classes in CASES:
        model = models.build(name, shape, classes, **options)
        lines.append(
            f"| {label} | {'x'.join(map(str, shape))} | {classes} | "
            f"{stats.count_params(model):,} | {stats.count_macs(model):,} |"
        )
    table = "\n".join(lines) + "\n"
    fileio.write_text(_OUT.value, table)
    print(table)


if __name__ == "__main__":
    app.run(main)
