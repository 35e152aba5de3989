"""Training worker groups as real subprocesses (MWMS over loopback): sharding, export, kill -9, SIGTERM, restarts.
Its spec, recipes and datasets are tested in-process in tests/unit/trainer/test_worker_inputs.py."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.kit.localinfra import free_port
from services.kit.processes import REPO_ROOT
from services.trainer.exit_codes import ExitCode

DIGITS = REPO_ROOT / "data" / "digits"
DIGITS_NPZ = {"path": str(DIGITS / "digits.npz"), "format": "npz", "num_classes": 10}


class WorkerGroup:
    """N worker processes of one job on loopback ports; progress files and logs under `root`."""

    def __init__(self, root: Path, spec: dict, workers: int) -> None:
        self.root = root
        self.spec_path = root / "spec.json"
        self.write_spec(spec)
        ports: set[int] = set()
        while len(ports) < workers:
            ports.add(free_port())
        self.addresses = [f"127.0.0.1:{port}" for port in sorted(ports)]
        self.processes: list[subprocess.Popen] = []

    def write_spec(self, spec: dict) -> None:
        self.spec_path.write_text(json.dumps(spec))

    def env(self, task: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        if len(self.addresses) > 1:
            cluster = {"cluster": {"worker": self.addresses}, "task": {"type": "worker", "index": task}}
            env["TF_CONFIG"] = json.dumps(cluster)
        return {**env, "TF_USE_LEGACY_KERAS": "1", "MODELGRID_PROGRESS_FILE": str(self.progress_path(task))}

    def progress_path(self, task: int) -> Path:
        return self.root / f"progress-{task}.jsonl"

    def start(self, tasks: list[int] | None = None) -> "WorkerGroup":
        self.processes = []
        for task in range(len(self.addresses)) if tasks is None else tasks:
            with (self.root / f"worker-{task}.log").open("ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "services.trainer.worker", "--spec", str(self.spec_path)],
                        env=self.env(task),
                        cwd=REPO_ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        return self

    def events(self, task: int, kind: str | None = None) -> list[dict]:
        path = self.progress_path(task)
        lines = path.read_text().splitlines() if path.exists() else []
        events = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in events if kind is None or e["event"] == kind]

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise AssertionError(f"gave up waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"workers still running after {timeout}s\n{self.logs()}") from None
        return codes

    def logs(self) -> str:
        tails = []
        for log in sorted(self.root.glob("worker-*.log")):
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if not ln.startswith(("I0000", "W0000"))]
            tails.append(f"--- {log.name}\n" + "\n".join(lines[-25:]))
        return "\n".join(tails)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def groups() -> Iterator[Callable[..., WorkerGroup]]:
    made: list[WorkerGroup] = []

    def make(root: Path, spec: dict, workers: int = 2) -> WorkerGroup:
        root.mkdir(parents=True, exist_ok=True)
        made.append(WorkerGroup(root, spec, workers))
        return made[-1]

    yield make
    for group in made:
        group.stop()


def digits_spec(tmp_path: Path, **overrides) -> dict:
    return {
        "recipe": "mlp",
        "recipe_params": {"hidden_units": [64]},
        "dataset": DIGITS_NPZ,
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 0.01,
        "validation_split": 0.2,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "checkpoint_every_steps": 5,
        "export_dir": str(tmp_path / "export"),
        "report_every_steps": 1,
        "seed": 7,
        **overrides,
    }


def last_step(group: WorkerGroup, task: int) -> int:
    steps = group.events(task, "step")
    return steps[-1]["step"] if steps else 0


@pytest.mark.slow
def test_two_workers_train_shard_disjointly_and_export(tmp_path: Path, groups):
    import tensorflow as tf

    from services.trainer.worker.data import split_ids

    group = groups(tmp_path, digits_spec(tmp_path, record_shard_ids=True)).start()
    assert group.wait(timeout=110) == [ExitCode.OK, ExitCode.OK], group.logs()

    for task in (0, 1):
        kinds = [e["event"] for e in group.events(task)]
        assert kinds[0] == "shard" and kinds[1] == "started" and kinds[-1] == "finished", kinds
        assert kinds.count("epoch") == 3
        started = group.events(task, "started")[0]
        assert started["workers"] == 2 and started["task"] == task and started["initial_step"] == 0
    exported = group.events(0, "exported")
    assert len(exported) == 1 and not group.events(1, "exported")
    assert exported[0]["metrics"]["val_accuracy"] >= 0.85 and exported[0]["metrics"]["steps"] == 3 * 23

    # Each worker recorded the example ids it read in epoch 1: disjoint halves that together are the train set.
    with np.load(DIGITS / "digits.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    expected_train, _ = split_ids(np.arange(len(y)), 0.2, seed=7)
    shards = [json.loads((tmp_path / "checkpoints" / "shards" / f"task-{t}.json").read_text()) for t in (0, 1)]
    seen = [set(s["ids"]) for s in shards]
    assert all(s["policy"] == "DATA" for s in shards)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(expected_train.tolist())
    assert abs(len(seen[0]) - len(seen[1])) <= 32
    for task in (0, 1):
        assert group.events(task, "shard")[0]["num_examples"] == len(seen[task])

    loaded = tf.saved_model.load(exported[0]["path"])
    serving = loaded.signatures["serving_default"]
    assert list(serving.structured_input_signature[1]) == ["x"]
    probabilities = serving(x=tf.constant(x))["probabilities"].numpy()
    assert probabilities.shape == (len(y), 10)
    assert (probabilities.argmax(axis=1) == y).mean() >= 0.85


@pytest.mark.slow
def test_cnn_on_three_csv_files_shards_by_file(tmp_path: Path, groups):
    from services.trainer.worker.data import split_ids

    lines = (DIGITS / "digits.csv").read_text().splitlines()
    parts = [lines[1:600], lines[600:1200], lines[1200:]]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part-{i}.csv")
        paths[-1].write_text("\n".join([lines[0], *part]) + "\n")
    dataset = {"paths": [str(p) for p in paths], "format": "csv", "label_column": "label", "num_classes": 10}
    spec = digits_spec(tmp_path, recipe="cnn", recipe_params={}, dataset=dataset, epochs=1, record_shard_ids=True)
    group = groups(tmp_path, spec).start()
    assert group.wait(timeout=110) == [ExitCode.OK, ExitCode.OK], group.logs()

    shards = [json.loads((tmp_path / "checkpoints" / "shards" / f"task-{t}.json").read_text()) for t in (0, 1)]
    assert [s["policy"] for s in shards] == ["FILE", "FILE"]
    files = [{i >> 32 for i in s["ids"]} for s in shards]
    assert not files[0] & files[1] and files[0] | files[1] == {0, 1, 2}
    all_ids = np.concatenate([i * 2**32 + np.arange(len(part)) for i, part in enumerate(parts)])
    expected_train, _ = split_ids(all_ids, 0.2, seed=7)
    assert set(shards[0]["ids"]) | set(shards[1]["ids"]) == set(expected_train.tolist())
    assert group.events(0, "exported")[0]["metrics"]["val_accuracy"] > 0.5


@pytest.mark.slow
def test_killed_worker_fails_the_group_and_a_restart_resumes(tmp_path: Path, groups):
    spec = digits_spec(tmp_path, step_delay_ms=300)
    group = groups(tmp_path, spec).start()
    group.wait_for("step 12 on both workers", lambda: min(last_step(group, 0), last_step(group, 1)) >= 12, 60)

    group.processes[0].kill()  # the chief: it also hosts the coordination service
    killed_at = time.monotonic()
    survivor = group.processes[1].wait(timeout=30)
    detection = time.monotonic() - killed_at
    assert survivor not in (ExitCode.OK, ExitCode.PREEMPTED), group.logs()
    assert group.processes[0].wait() == -signal.SIGKILL
    reached = last_step(group, 1)

    group.write_spec({**spec, "step_delay_ms": 0})  # the testing aid only; finish quickly
    group.start()
    assert group.wait(timeout=90) == [ExitCode.OK, ExitCode.OK], group.logs()
    restarted = [group.events(task, "started")[-1] for task in (0, 1)]
    assert [s["attempt"] for s in restarted] == [2, 2]
    initial = {s["initial_step"] for s in restarted}
    assert len(initial) == 1, restarted
    initial_step = initial.pop()
    assert 10 <= initial_step <= reached and initial_step % spec["checkpoint_every_steps"] == 0, (initial, reached)
    assert group.events(0, "exported") and group.events(0, "finished")[-1]["step"] == 3 * 23
    print(f"survivor exited {detection:.1f}s after the kill with code {survivor}")


@pytest.mark.slow
def test_sigterm_saves_at_an_agreed_step_exits_42_and_relaunch_resumes_there(tmp_path: Path, groups):
    # No periodic backup before the signal: resuming past step 0 proves the preemption save.
    spec = digits_spec(tmp_path, step_delay_ms=200, epochs=2, checkpoint_every_steps=1000)
    group = groups(tmp_path, spec).start()
    group.wait_for("step 8 on both workers", lambda: min(last_step(group, 0), last_step(group, 1)) >= 8, 60)

    group.processes[1].send_signal(signal.SIGTERM)
    assert group.wait(timeout=30) == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], group.logs()
    saved = {group.events(task, "preempted")[-1]["step"] for task in (0, 1)}
    assert len(saved) == 1
    saved_step = saved.pop()
    assert saved_step > 8

    group.write_spec({**spec, "step_delay_ms": 0})
    group.start()
    assert group.wait(timeout=90) == [ExitCode.OK, ExitCode.OK], group.logs()
    assert [group.events(task, "started")[-1]["initial_step"] for task in (0, 1)] == [saved_step, saved_step]
    assert group.events(0, "finished")[-1]["step"] == 2 * 23


@pytest.mark.slow
def test_injected_crash_fires_on_the_first_attempt_only_unless_always(tmp_path: Path, groups):
    spec = digits_spec(tmp_path, epochs=1, crash_at_step=12, crash_task=0, record_shard_ids=False)
    group = groups(tmp_path, spec, workers=1).start()
    assert group.wait(timeout=60) == [ExitCode.INJECTED_CRASH], group.logs()
    assert last_step(group, 0) == 12

    group.write_spec({**spec, "always_crash": True})
    group.start()
    assert group.wait(timeout=60) == [ExitCode.INJECTED_CRASH], group.logs()

    group.write_spec(spec)
    group.start()
    assert group.wait(timeout=60) == [ExitCode.OK], group.logs()
    assert [s["initial_step"] for s in group.events(0, "started")] == [0, 10, 10]
    assert [s["attempt"] for s in group.events(0, "started")] == [1, 2, 3]


@pytest.mark.slow
def test_unusable_jobs_exit_2(tmp_path: Path, groups):
    bad_field = groups(tmp_path / "a", {**digits_spec(tmp_path), "epochz": 1}, workers=1)
    bad_recipe = groups(tmp_path / "b", digits_spec(tmp_path, recipe="file:../x.py", recipes_dir=str(tmp_path)), 1)
    codes = [group.start().wait(timeout=60) for group in (bad_field, bad_recipe)]
    assert codes == [[ExitCode.INVALID_SPEC], [ExitCode.INVALID_SPEC]], bad_recipe.logs()


@pytest.mark.slow
def test_a_worker_whose_peers_never_come_gives_up_after_startup_timeout(tmp_path: Path, groups):
    group = groups(tmp_path, digits_spec(tmp_path, startup_timeout_s=3)).start(tasks=[1])
    began = time.monotonic()
    assert group.wait(timeout=60) == [-signal.SIGALRM], group.logs()
    assert time.monotonic() - began < 30 and not group.events(1)
