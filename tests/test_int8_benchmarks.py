"""benchmarks/int8_draws.py runs end to end on a small model, so it does not rot between its real runs."""

import json
import os
import subprocess
import sys

import keras
import pytest
from conftest import REPO
from test_edge_benchmarks import markdown_tables


def _run(tmp_path, fixes):
    command = [
        sys.executable,
        "benchmarks/int8_draws.py",
        "--models=tiny",
        f"--out_dir={tmp_path}",
        f"--results_dir={tmp_path / 'results'}",
        "--draws=2",
        "--eval_examples=200",
        f"--fixes={fixes}",
    ]
    run = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / "results" / "int8_draws.json").read_text())


@pytest.mark.slow
def test_int8_draws_reports_each_steps_agreement_per_calibration_draw(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization(beta_initializer="random_normal")(x)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs, name="tiny").save(tmp_path / "tiny.keras")

    report = _run(tmp_path, "fold")
    (row,) = report["rows"]
    assert (row["model"], row["fixes"]) == ("tiny", ["fold"])
    assert [s["step"] for s in row["steps"]] == ["plain", "fold"]
    for step in row["steps"]:
        assert len(step["test_agreement"]) == len(step["check_agreement"]) == 2
        assert all(0.0 <= a <= 1.0 for a in step["test_agreement"] + step["check_agreement"])
        assert step["spread"]["min"] <= step["spread"]["median"] <= step["spread"]["max"]
        assert step["spread"]["min"] == min(step["test_agreement"])

    # another set of fixes adds its rows; the same set again replaces its own
    _run(tmp_path, "fold,equalize")
    report = _run(tmp_path, "fold")
    assert [(r["fixes"], [s["step"] for s in r["steps"]]) for r in report["rows"]] == [
        (["fold", "equalize"], ["plain", "fold", "equalize"]),
        (["fold"], ["plain", "fold"]),
    ]
    (table,) = markdown_tables((tmp_path / "results" / "int8_draws.md").read_text())
    assert table[0][:3] == ["model", "fixes run", "step"]
    assert [row[1:3] for row in table[1:]] == [
        ["fold,equalize", "plain"],
        ["fold,equalize", "fold"],
        ["fold,equalize", "equalize"],
        ["fold", "plain"],
        ["fold", "fold"],
    ]
