"""The edge benchmarks (benchmarks/edge.py, edge_widths.py, edge_layers.py) run end to end on a
small teacher and a student cut from it, so none of them rots between their real runs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO
from test_compress import small_teacher

from tfsubspace import analysis, surgery


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    a = analysis.analyze(teacher)
    masks = {g.name: np.arange(g.size) % 2 == 0 for g in a.groups.values() if g.prunable}
    student = surgery.apply_plan(teacher, surgery.PruningPlan.from_masks(a, masks)).model
    root = tmp_path_factory.mktemp("edge")
    teacher.save(root / "teacher.keras")
    student.save(root / "student.keras")
    return root


@pytest.mark.parametrize("script, outputs", [("edge", ["edge.json", "edge.md"]),
                                             ("edge_widths", ["edge_widths.json", "edge_widths.md"]),
                                             ("edge_layers", ["edge_layers.json", "edge_layers.md"])])
def test_edge_benchmark_runs_on_a_small_pair(pair, tmp_path, script, outputs):
    command = [sys.executable, f"benchmarks/{script}.py", f"--teacher={pair / 'teacher.keras'}",
               f"--student={pair / 'student.keras'}", f"--out_dir={tmp_path / 'out'}", f"--results_dir={tmp_path}",
               "--runs=3"] + ([] if script == "edge" else ["--repeats=1"])
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / outputs[0]).read_text())
    assert report["student"] == str(pair / "student.keras")
    assert "| " in (tmp_path / outputs[1]).read_text()
