"""tf.distribute: MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1 against
the single-process run, chief-only writes, a lost worker, and the strategy names."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO

from tfsubspace.errors import TfSubspaceError
from tfsubspace.train import distribute

WORKER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from tfsubspace import compress, data, fileio
    from tfsubspace.train import distribute
    strategy = distribute.get_strategy(sys.argv[1], timeout_s=float(sys.argv[4]))
    teacher = fileio.load_model(sys.argv[2])
    ds = data.load("mnist", "train", batch_size=32, limit=int(sys.argv[5]), labels=False, seed=0)
    result = compress(teacher, ds, work_dir=sys.argv[3], strategy=strategy, width_ratio=1.0, multiple=1,
                      epochs=int(sys.argv[6]), recover_epochs=0, lasso=2.5, target_params=0.5, stats_batches=4,
                      bn_batches=4, seed=0, verbose=0, adapt="none")  # the untrained teacher: MNIST is no domain of it
    print("PLAN", json.dumps({g: v["keep"] for g, v in result.plan.groups.items()}))
""")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(tmp_path, teacher_path, *, limit=512, epochs=2, timeout_s=300):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    "multi_worker",
                    str(teacher_path),
                    str(tmp_path / "work"),
                    str(timeout_s),
                    str(limit),
                    str(epochs),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    import keras
    from test_compress import small_teacher

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    small_teacher().save(path)
    return path


def plan_of(stdout):
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("PLAN"))[5:])


@pytest.mark.slow
def test_two_workers_on_localhost_find_the_single_process_plan(teacher_path, tmp_path):
    single = subprocess.run(
        [sys.executable, "-c", WORKER, "default", str(teacher_path), str(tmp_path / "single"), "60", "512", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    procs = start_workers(tmp_path, teacher_path)
    outs = [p.communicate(timeout=600) for p in procs]
    for index, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"worker {index}: {err[-3000:]}\nother worker: {outs[1 - index][1][-3000:]}"
    plans = [plan_of(out) for out, _ in outs]
    assert plans[0] == plans[1]  # the workers stay in step
    reference = plan_of(single.stdout)
    kept = sum(len(v) for v in reference.values())
    same = sum(len(set(reference[g]) & set(plans[0][g])) for g in reference)
    assert same >= 0.9 * kept, (reference, plans[0])  # per-replica BN statistics differ a little
    # only the chief wrote: the work directory holds the outputs, the worker's copy is gone
    assert (tmp_path / "work" / "student.keras").exists() or (tmp_path / "work" / "student_pruned.keras").exists()
    assert not list(tmp_path.glob("tfsubspace-worker-*"))


def test_a_workers_copy_leaves_out_the_files_the_chief_is_writing(tmp_path, monkeypatch):
    # the chief claims its work dir (the manifest, written through a .tmp- file) while the other
    # worker copies it: a copy with the temporary file and no manifest would be refused
    work = tmp_path / "work"
    work.mkdir()
    (work / "student_init.keras").write_bytes(b"stage")
    (work / ".tmp-x1-manifest.json").write_text("{")
    monkeypatch.setattr(distribute, "is_chief", lambda strategy=None: False)
    with distribute.private_work_dir(work, strategy=object()) as copy:
        assert copy != work and sorted(p.name for p in copy.iterdir()) == ["student_init.keras"]
    assert not copy.exists()


@pytest.mark.slow
def test_a_lost_worker_is_reported(teacher_path, tmp_path):
    # The timeout (collectives and heartbeats) must outlast a worker's lag on a loaded machine (CI
    # runs other tests beside these two processes) and bounds how long the lost worker goes unnoticed.
    procs = start_workers(tmp_path, teacher_path, limit=4096, epochs=50, timeout_s=60)
    deadline = time.time() + 420
    while not list((tmp_path / "work").glob("distill_backup/*.weights.h5")) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    if any(p.poll() is not None for p in procs):
        for p in procs:
            p.kill()
        errs = [p.communicate()[1] for p in procs]
        pytest.fail(
            f"the run ended before a worker could be lost\nworker 0: {errs[0][-3000:]}\nworker 1: {errs[1][-3000:]}"
        )
    procs[1].send_signal(signal.SIGKILL)
    out, err = procs[0].communicate(timeout=300)
    procs[1].communicate()
    assert procs[0].returncode != 0
    assert "stopped answering" in err, err[-3000:]


def test_strategy_names_and_tf_config_are_checked(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TfSubspaceError, match="needs TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(TfSubspaceError, match="not a valid cluster"):
        distribute.get_strategy("multi_worker")
    with pytest.raises(ValueError, match="Unknown strategy"):
        distribute.get_strategy("tpu")
    default = distribute.get_strategy("default")
    assert distribute.is_chief(default) and not distribute.is_multi_worker(default)
    assert np.isfinite(default.num_replicas_in_sync)


@pytest.mark.slow
def test_scripts_train_and_compress_under_mirrored_strategy(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    teacher = tmp_path / "teacher.keras"
    run = subprocess.run(
        [
            sys.executable,
            "scripts/train_teacher.py",
            "--model=lenet5",
            "--dataset=mnist",
            "--train_examples=512",
            "--test_examples=256",
            "--epochs=1",
            "--strategy=mirrored",
            f"--output={teacher}",
            "--verbose=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert teacher.exists() and "test accuracy" in run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "scripts/compress.py",
            f"--teacher={teacher}",
            "--dataset=mnist",
            "--examples=256",
            "--eval_examples=256",
            "--epochs=1",
            "--recover_epochs=1",
            "--strategy=mirrored",
            f"--work_dir={tmp_path / 'work'}",
            "--verbose=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "work" / "student.keras").exists() and "student:" in run.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "scripts/compress.py",
            f"--teacher={teacher}",
            "--strategy=tpu",
            f"--work_dir={tmp_path / 'bad'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "--strategy" in bad.stderr


def test_heartbeats_wait_as_long_as_the_collectives():
    # TensorFlow's default heartbeat timeout (10 s) ended runs on a loaded machine; in a child
    # process, since the coordination service's settings are the process's for good
    code = textwrap.dedent("""
        from tensorflow.python.eager import context
        from tfsubspace.train import distribute
        distribute._patient_heartbeats({"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, 77.0)
        config = context.context().coordination_service
        print("CONFIG", config.heartbeat_timeout_in_ms, config.service_leader, config.coordinated_job_list[0].num_tasks)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(row for row in run.stdout.splitlines() if row.startswith("CONFIG"))
    assert line.split()[1:] == ["77000", "/job:worker/replica:0/task:0", "2"]
