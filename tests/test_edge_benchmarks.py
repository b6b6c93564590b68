"""The edge benchmarks (benchmarks/edge.py, edge_widths.py, edge_layers.py) run end to end on a
small teacher and a student cut from it, so none of them rots between their real runs."""

import itertools
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO
from test_compress import small_teacher

from tfsubspace.prune import analysis, surgery
from tfsubspace.prune.plan import PruningPlan


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    keras.utils.set_random_seed(0)
    teacher = small_teacher()
    a = analysis.analyze(teacher)
    masks = {g.name: np.arange(g.size) % 2 == 0 for g in a.groups.values() if g.prunable}
    student = surgery.apply_plan(teacher, PruningPlan.from_masks(a, masks)).model
    root = tmp_path_factory.mktemp("edge")
    teacher.save(root / "teacher.keras")
    student.save(root / "student.keras")
    return root


def markdown_tables(text):
    """Each Markdown table of `text`, as rows of stripped cells (header first, the |---| rule left out)."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


HEADERS = {
    "edge": [
        "model",
        "mode",
        "batch",
        "params",
        "MACs",
        "file",
        "latency median (p90)",
        "per image",
        "speed-up",
        "MCU arena",
        "accuracy",
        "agreement",
    ],
    "edge_widths": ["variant", "widths", "params", "MACs", "latency", "speed-up", "MAC reduction", "efficiency"],
    "edge_layers": [
        "layer",
        "teacher output",
        "student output",
        "teacher MACs",
        "student MACs",
        "MAC reduction",
        "teacher time",
        "student time",
        "speed-up",
        "teacher GMAC/s",
        "student GMAC/s",
        "share of student time",
    ],
}


def expected_rows(script, report):
    """The identifying cells and MACs of each row the script's table should show, from its JSON report."""
    if script == "edge":
        return [[r["label"], r["mode"], str(r["batch"]), f"{r['macs']:,}"] for r in report["rows"]]
    if script == "edge_widths":
        return [[r["variant"], f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}M"] for r in report["rows"]]
    total = report["total"]
    return [[r["layer"], f"{r['teacher']['macs']:,}", f"{r['student']['macs']:,}"] for r in report["rows"]] + [
        ["**total**", f"{total['teacher']['macs']:,}", f"{total['student']['macs']:,}"]
    ]


KEY_COLUMNS = {
    "edge": ["model", "mode", "batch", "MACs"],
    "edge_widths": ["variant", "params", "MACs"],
    "edge_layers": ["layer", "teacher MACs", "student MACs"],
}


@pytest.mark.parametrize(
    "script, outputs",
    [
        ("edge", ["edge.json", "edge.md"]),
        ("edge_widths", ["edge_widths.json", "edge_widths.md"]),
        ("edge_layers", ["edge_layers.json", "edge_layers.md"]),
    ],
)
@pytest.mark.slow
def test_edge_benchmark_runs_on_a_small_pair(pair, tmp_path, script, outputs):
    command = [
        sys.executable,
        f"benchmarks/{script}.py",
        f"--teacher={pair / 'teacher.keras'}",
        f"--student={pair / 'student.keras'}",
        f"--out_dir={tmp_path / 'out'}",
        f"--results_dir={tmp_path}",
        "--runs=3",
    ] + ([] if script == "edge" else ["--repeats=1"])
    run = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / outputs[0]).read_text())
    assert report["student"] == str(pair / "student.keras")
    table, *others = markdown_tables((tmp_path / outputs[1]).read_text())
    header, body = table[0], table[1:]
    assert header == HEADERS[script]
    assert all(len(row) == len(header) for row in body), body
    keys = [header.index(c) for c in KEY_COLUMNS[script]]
    assert [[row[k] for k in keys] for row in body] == expected_rows(script, report)
    if script == "edge":  # each model in each mode at batch 1 and 32, then the targets it is held to
        assert {tuple(row[:3]) for row in body} == set(
            itertools.product(("teacher", "student"), ("float32", "int8"), ("1", "32"))
        )
        (targets,) = others
        assert targets[0] == ["target", "measured", "limit", "met"]
        assert [(row[0], row[3]) for row in targets[1:]] == [
            (name, "yes" if t["met"] else "NO") for name, t in report["targets"].items()
        ]
    elif script == "edge_widths":
        assert {"teacher", "student"} <= {row[0] for row in body}
        teacher = next(row for row in body if row[0] == "teacher")
        assert teacher[header.index("speed-up")] == teacher[header.index("MAC reduction")] == "1.00x"
    else:
        assert len(body) >= 2 and not others  # at least one layer, then the total
