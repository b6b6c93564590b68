"""scripts/train_teacher.py end to end, its flag checks, and resume after SIGKILL."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import pytest
from conftest import REPO, write_idx_dataset

SCRIPT = str(REPO / "scripts" / "train_teacher.py")


def run(args, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture
def env(tmp_path):
    write_idx_dataset(tmp_path / "data", "mnist", n_train=512, n_test=64)
    return dict(os.environ, TFSUBSPACE_DATA_DIR=str(tmp_path / "data"), TF_CPP_MIN_LOG_LEVEL="2")


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, env):
    out = tmp_path / "teacher.keras"
    result = run(["--model=lenet5", "--epochs=1", "--batch_size=64", "--verbose=2", f"--output={out}"], env=env)
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert metrics["params"] == 61706
    model = keras.models.load_model(out)
    assert model.output_shape == (None, 10)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=resnet"], "value should be one of <lenet5|vgg16|wrn>"),
        (["--dataset=imagenet"], "value should be one of <mnist|fashion_mnist"),
        (["--epochs=-1"], "--epochs=-1: -1 is not a positive integer"),
        (["--output=model.h5"], "--output must end in .keras"),
        ([], "Flag --output must have a value"),
    ],
)
def test_bad_flags_stop_at_once(tmp_path, env, args, message):
    if not any(a.startswith("--output") for a in args) and args:
        args = args + [f"--output={tmp_path / 'm.keras'}"]
    start = time.monotonic()
    result = run(args, env=env)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path, env):
    out = tmp_path / "teacher.keras"
    args = ["--model=lenet5", "--epochs=4", "--batch_size=8", "--verbose=2", f"--output={out}"]
    backup = tmp_path / "teacher.work" / "backup"
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not list(backup.glob("epoch-*.weights.h5")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()

    result = run(args, env=env)
    assert result.returncode == 0, result.stderr
    first_epoch = int(re.search(r"Epoch (\d+)/4", result.stdout + result.stderr).group(1))
    assert first_epoch >= 2, "the second run started over instead of resuming"
    with open(tmp_path / "teacher.work" / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [0, 1, 2, 3]
    assert out.exists() and not backup.exists()


@pytest.mark.slow
def test_tensorboard_logs(tmp_path, env):
    out, tb = tmp_path / "t.keras", tmp_path / "tb"
    result = run(
        [
            "--model=lenet5",
            "--epochs=1",
            "--batch_size=128",
            "--verbose=0",
            f"--output={out}",
            f"--tensorboard_dir={tb}",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tb.rglob("events.out.tfevents.*"))
