"""Training worker: recipes and datasets in-process; real worker groups (MWMS over loopback) as subprocesses."""

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
from services.trainer.worker import (
    EXIT_INJECTED_CRASH,
    EXIT_INVALID_SPEC,
    EXIT_OK,
    EXIT_PREEMPTED,
    DatasetSpec,
    WorkerSpec,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = REPO_ROOT / "data" / "digits"
DIGITS_NPZ = {"path": str(DIGITS / "digits.npz"), "format": "npz", "num_classes": 10}


# ---------------------------------------------------------------- spec, recipes, data (in-process)


def test_spec_parses_and_rejects_unknown_fields():
    raw = {"recipe": "mlp", "dataset": DIGITS_NPZ, "checkpoint_dir": "/tmp/x", "epochs": 2}
    spec = WorkerSpec.from_json(json.dumps(raw))
    assert spec.dataset.paths == (DIGITS_NPZ["path"],) and spec.epochs == 2 and spec.report_every_steps == 10
    assert WorkerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown field"):
        WorkerSpec.from_json(json.dumps({**raw, "epoch": 3}))
    with pytest.raises(ValueError, match="format"):
        WorkerSpec.from_json(json.dumps({**raw, "dataset": {**DIGITS_NPZ, "format": "parquet"}}))
    with pytest.raises(ValueError, match="batch_size"):
        WorkerSpec.from_json(json.dumps({**raw, "batch_size": 0}))


@pytest.fixture
def recipes_dir(tmp_path: Path) -> Path:
    root = tmp_path / "recipes"
    (root / "nested").mkdir(parents=True)
    body = (
        "import tf_keras as keras\n\n"
        "def build_model(input_shape, num_classes, units=8):\n"
        "    x = keras.Input(shape=input_shape, name='x')\n"
        "    h = keras.layers.Dense(units, activation='relu')(x)\n"
        "    return keras.Model(x, keras.layers.Dense(num_classes, activation='softmax')(h))\n"
    )
    (root / "nested" / "tiny.py").write_text(body)
    (tmp_path / "outside.py").write_text(body)
    (root / "escape.py").symlink_to(tmp_path / "outside.py")
    (root / "noentry.py").write_text("x = 1\n")
    (root / "broken.py").write_text("import no_such_module_here\n")
    return root


def test_file_recipe_inside_the_directory_builds(recipes_dir: Path):
    from services.trainer.worker.recipes import build_model

    model = build_model("file:nested/tiny.py", (64,), 10, {"units": 4}, str(recipes_dir))
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="bad recipe_params"):
        build_model("file:nested/tiny.py", (64,), 10, {"layers": 3}, str(recipes_dir))
    with pytest.raises(ValueError, match="no build_model"):
        build_model("file:noentry.py", (64,), 10, {}, str(recipes_dir))
    with pytest.raises(ValueError, match="importing file:broken.py failed"):
        build_model("file:broken.py", (64,), 10, {}, str(recipes_dir))
    with pytest.raises(ValueError, match="build_model failed"):
        build_model("file:nested/tiny.py", (64,), 10, {"units": -1}, str(recipes_dir))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("file:../outside.py", "outside the recipes directory"),
        ("file:nested/../../outside.py", "outside the recipes directory"),
        ("file:/etc/passwd", "relative"),
        ("file:escape.py", "outside the recipes directory"),
        ("file:missing.py", "not a .py file"),
        ("file:nested", "not a .py file"),
        ("resnet9000", "unknown built-in"),
    ],
)
def test_recipe_loading_refuses(recipes_dir: Path, name: str, message: str):
    from services.trainer.worker.recipes import load_recipe

    with pytest.raises(ValueError, match=message):
        load_recipe(name, str(recipes_dir))


def test_file_recipe_needs_a_recipes_dir():
    from services.trainer.worker.recipes import load_recipe

    with pytest.raises(ValueError, match="recipes_dir"):
        load_recipe("file:tiny.py", None)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builtin_recipes_build(name: str):
    from services.trainer.worker import BUILTIN_RECIPE_NAMES
    from services.trainer.worker.recipes import BUILTIN_RECIPES, build_model

    assert tuple(BUILTIN_RECIPES) == BUILTIN_RECIPE_NAMES  # the names the trainer checks specs against

    model = build_model(name, (64,), 10, {})
    assert model.output_shape == (None, 10)
    probabilities = model(np.zeros((2, 64), np.float32)).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _read_all(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from services.trainer.worker.data import load_examples

    dataset, _ = load_examples(spec)
    x, y, ids = (np.stack(column) for column in zip(*dataset.as_numpy_iterator(), strict=True))
    return x, y, ids


def test_csv_npz_and_tfrecord_give_the_same_examples(tmp_path: Path):
    from services.trainer.worker.data import write_tfrecord

    with np.load(DIGITS / "digits.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    write_tfrecord(tmp_path / "digits.tfrecord", x, y, features_key="pixels", label_key="digit")
    specs = [
        DatasetSpec.from_dict(DIGITS_NPZ),
        DatasetSpec.from_dict({"path": str(DIGITS / "digits.csv"), "format": "csv", "label_column": "label"}),
        DatasetSpec.from_dict(
            {
                "path": str(tmp_path / "digits.tfrecord"),
                "format": "tfrecord",
                "features_key": "pixels",
                "label_key": "digit",
            }
        ),
    ]
    for spec in specs:
        got_x, got_y, got_ids = _read_all(spec)
        np.testing.assert_array_equal(got_x, x, err_msg=spec.format)
        np.testing.assert_array_equal(got_y, y, err_msg=spec.format)
        np.testing.assert_array_equal(got_ids, np.arange(len(y)), err_msg=spec.format)


def test_several_files_shard_by_file_and_keep_file_ids(tmp_path: Path):
    from services.trainer.worker.data import AutoShardPolicy, make_training_data, shard_policy

    lines = (DIGITS / "digits.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    paths = []
    for i, part in enumerate((rows[:100], rows[100:250])):
        paths.append(str(tmp_path / f"part-{i}.csv"))
        Path(paths[-1]).write_text("\n".join([header, *part]) + "\n")
    spec = DatasetSpec.from_dict({"paths": paths, "format": "csv", "feature_columns": ["p10", "p20", "p30"]})
    assert shard_policy(spec, num_workers=2) == AutoShardPolicy.FILE
    assert shard_policy(spec, num_workers=3) == AutoShardPolicy.DATA  # fewer files than workers
    x, _, ids = _read_all(spec)
    assert x.shape == (250, 3)
    np.testing.assert_array_equal(ids, np.concatenate([np.arange(100), 2**32 + np.arange(150)]))
    data = make_training_data(
        spec, per_replica_batch=8, num_replicas=2, num_workers=2, validation_split=0.2, seed=1, repeat=False
    )
    assert data.train_examples + data.validation_examples == 250 and data.num_classes == 10
    assert data.global_batch_size == 16 and data.steps_per_epoch == -(-data.train_examples // 16)


def test_validation_split_is_a_stable_function_of_the_example_id():
    from services.trainer.worker.data import split_ids

    ids = np.arange(1797)
    train, validation = split_ids(ids, 0.2, seed=0)
    assert not set(train) & set(validation) and len(train) + len(validation) == 1797
    assert 0.15 < len(validation) / 1797 < 0.25
    np.testing.assert_array_equal(split_ids(ids[::-1], 0.2, seed=0)[1], validation[::-1])
    assert not np.array_equal(split_ids(ids, 0.2, seed=1)[1], validation)


# ---------------------------------------------------------------- real worker processes


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
    assert group.wait(timeout=110) == [EXIT_OK, EXIT_OK], group.logs()

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
    assert group.wait(timeout=110) == [EXIT_OK, EXIT_OK], group.logs()

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
    assert survivor not in (EXIT_OK, EXIT_PREEMPTED), group.logs()
    assert group.processes[0].wait() == -signal.SIGKILL
    reached = last_step(group, 1)

    group.write_spec({**spec, "step_delay_ms": 0})  # the testing aid only; finish quickly
    group.start()
    assert group.wait(timeout=90) == [EXIT_OK, EXIT_OK], group.logs()
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
    assert group.wait(timeout=30) == [EXIT_PREEMPTED, EXIT_PREEMPTED], group.logs()
    saved = {group.events(task, "preempted")[-1]["step"] for task in (0, 1)}
    assert len(saved) == 1
    saved_step = saved.pop()
    assert saved_step > 8

    group.write_spec({**spec, "step_delay_ms": 0})
    group.start()
    assert group.wait(timeout=90) == [EXIT_OK, EXIT_OK], group.logs()
    assert [group.events(task, "started")[-1]["initial_step"] for task in (0, 1)] == [saved_step, saved_step]
    assert group.events(0, "finished")[-1]["step"] == 2 * 23


@pytest.mark.slow
def test_injected_crash_fires_on_the_first_attempt_only_unless_always(tmp_path: Path, groups):
    spec = digits_spec(tmp_path, epochs=1, crash_at_step=12, crash_task=0, record_shard_ids=False)
    group = groups(tmp_path, spec, workers=1).start()
    assert group.wait(timeout=60) == [EXIT_INJECTED_CRASH], group.logs()
    assert last_step(group, 0) == 12

    group.write_spec({**spec, "always_crash": True})
    group.start()
    assert group.wait(timeout=60) == [EXIT_INJECTED_CRASH], group.logs()

    group.write_spec(spec)
    group.start()
    assert group.wait(timeout=60) == [EXIT_OK], group.logs()
    assert [s["initial_step"] for s in group.events(0, "started")] == [0, 10, 10]
    assert [s["attempt"] for s in group.events(0, "started")] == [1, 2, 3]


@pytest.mark.slow
def test_unusable_jobs_exit_2(tmp_path: Path, groups):
    bad_field = groups(tmp_path / "a", {**digits_spec(tmp_path), "epochz": 1}, workers=1)
    bad_recipe = groups(tmp_path / "b", digits_spec(tmp_path, recipe="file:../x.py", recipes_dir=str(tmp_path)), 1)
    codes = [group.start().wait(timeout=60) for group in (bad_field, bad_recipe)]
    assert codes == [[EXIT_INVALID_SPEC], [EXIT_INVALID_SPEC]], bad_recipe.logs()


@pytest.mark.slow
def test_a_worker_whose_peers_never_come_gives_up_after_startup_timeout(tmp_path: Path, groups):
    group = groups(tmp_path, digits_spec(tmp_path, startup_timeout_s=3)).start(tasks=[1])
    began = time.monotonic()
    assert group.wait(timeout=60) == [-signal.SIGALRM], group.logs()
    assert time.monotonic() - began < 30 and not group.events(1)
