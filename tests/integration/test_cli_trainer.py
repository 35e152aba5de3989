"""The `modelgrid` trainer commands (jobs ..., workers) in-process against real subprocesses: own Consul, a registry,
two worker agents with one slot each and a trainer. One real training run (examples/digits-mlp.yaml) serves every
test that needs a finished job."""

import contextlib
import io
import json
import os
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from modelgrid.client.artifacts import file_digest
from services.cli.main import run
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

CLIENT_ID = "cli-trainer-test@pytest"
EXAMPLE = REPO_ROOT / "examples" / "digits-mlp.yaml"
DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch):
    """Own Consul (the trainer sees only these agents and this registry), two agents, a trainer."""
    tmp = tmp_path_factory.mktemp("cli-trainer")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        prefix = f"mg:test-cli-trainer:{uuid.uuid4().hex[:6]}:"
        with launch.together():  # the trainer finds the registry and the agents in Consul when it needs them
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
            agents = [launch.agent(consul.http_url, tmp) for _ in range(2)]
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp, prefix)
        try:
            yield SimpleNamespace(tmp=tmp, registry=registry.target, trainer=trainer.target, tls_dir=internal_tls_dir)
        finally:
            trainer.stop()
            for agent in agents:
                agent.stop()
            registry.stop()


def cli(mesh, *args: str) -> int:
    # --tls-dir given here: module-scoped fixtures call this before the autouse environment applies
    return run(
        ["--tls-dir", str(mesh.tls_dir), "--target", mesh.registry, "--trainer", mesh.trainer, "--client-id", CLIENT_ID]
        + list(args)
    )


@pytest.fixture(autouse=True)
def cli_environment(monkeypatch, internal_tls_dir) -> None:
    """Output as when piped, whatever the environment says. The services are
    called directly, over mTLS as `operator` (--tls-dir from MODELGRID_TLS_DIR)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("MODELGRID_TLS_DIR", str(internal_tls_dir))


def write_spec(directory: Path, **changes) -> Path:
    """A copy of the example spec in `directory`, with its dataset path rewritten relative to the copy (relative
    paths are read against the spec file's directory) and `changes` applied (None removes a key)."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["dataset"]["local_path"] = os.path.relpath(DIGITS_NPZ, directory)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = directory / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def trained(mesh, unique):
    """`jobs submit SPEC --watch` of the example spec (its own model name), run to the end: its exit code, stdout,
    stderr, job id and model name."""
    model = unique("digits")
    spec = write_spec(mesh.tmp, register_model=model)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli(mesh, "jobs", "submit", str(spec), "--watch", "--request-id", f"req-{model}")
    out = stdout.getvalue()
    return SimpleNamespace(code=code, out=out, err=stderr.getvalue(), job_id=out.splitlines()[0], model=model)


def test_submit_watch_trains_registers_and_exits_0(mesh, trained, capsys):
    assert trained.code == 0, trained.out + trained.err
    assert cli(mesh, "--json", "jobs", "show", trained.job_id) == 0
    dataset = json.loads(capsys.readouterr().out)["spec"]["dataset"]
    assert dataset.get("blobDigest") == file_digest(DIGITS_NPZ) and "localPath" not in dataset, dataset
    lines = trained.out.splitlines()
    assert re.fullmatch(r"[0-9a-f]{12}", trained.job_id), lines[0]
    assert re.search(r" PENDING \(attempt 0\): submitted$", trained.out, re.MULTILINE)
    assert re.search(r" RUNNING \(attempt 1\): ", trained.out, re.MULTILINE)
    assert re.search(r" epoch 8/8 done at step \d+  .*val_accuracy \d\.\d{4}", trained.out)
    assert re.search(rf" registered {trained.model}:1$", trained.out, re.MULTILINE)
    assert re.search(r" step \d+  epoch \d/8  loss \d\.\d{4}  accuracy \d\.\d{4}$", trained.out, re.MULTILINE)
    pattern = rf"job {trained.job_id} SUCCEEDED: registered {trained.model}:1 \(.* val_accuracy (\d\.\d{{4}}).*\)"
    summary = re.fullmatch(pattern, lines[-1])
    assert summary, lines[-1]
    assert float(summary.group(1)) >= 0.85


def test_a_repeated_request_id_returns_the_same_job(mesh, trained, capsys):
    spec = write_spec(mesh.tmp, register_model=trained.model)
    assert cli(mesh, "jobs", "submit", str(spec), "--request-id", f"req-{trained.model}") == 0
    captured = capsys.readouterr()
    assert captured.out == f"{trained.job_id}\n"
    assert f"modelgrid jobs watch {trained.job_id}" in captured.err


def test_list_and_show(mesh, trained, capsys):
    assert cli(mesh, "jobs", "list") == 0
    table = capsys.readouterr().out
    header = "ID NAME STATE RECIPE WORKERS EPOCH STEP VAL_ACCURACY MODEL CREATED"
    assert table.splitlines()[0].split() == header.split()
    row = next(line for line in table.splitlines() if line.startswith(trained.job_id)).split()
    assert row[1:6] == ["digits-mlp", "SUCCEEDED", "mlp", "2", "8/8"]
    assert row[8] == f"{trained.model}:1"

    assert cli(mesh, "jobs", "list", "--state", "running") == 0
    assert trained.job_id not in capsys.readouterr().out
    assert cli(mesh, "--json", "jobs", "list", "--state", "SUCCEEDED") == 0
    assert trained.job_id in [job["id"] for job in json.loads(capsys.readouterr().out)["jobs"]]

    assert cli(mesh, "jobs", "show", trained.job_id) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^state\s+SUCCEEDED$", shown, re.MULTILINE)
    blob = f"blob {file_digest(DIGITS_NPZ)}"  # the CLI uploaded the spec's local_path
    assert re.search(rf"^dataset\s+{blob} \(npz: x, y, 10 classes\)$", shown, re.MULTILINE)
    assert re.search(r"^training\s+epochs 8, batch 32, lr 0.01, adam, validation 0.2, seed 1$", shown, re.MULTILINE)
    placements = re.findall(r"task (\d): (\S+) \(127\.0\.0\.1:\d+\)", shown)
    assert [task for task, _ in placements] == ["0", "1"] and len({agent for _, agent in placements}) == 2
    assert re.search(r"^metrics\s+loss \d\.\d{4}  accuracy \d\.\d{4}  val_loss .* val_accuracy", shown, re.MULTILINE)
    assert re.search(rf"^registered\s+{trained.model}:1$", shown, re.MULTILINE)
    assert re.search(rf"^register\s+{trained.model} @ production$", shown, re.MULTILINE)
    assert cli(mesh, "--json", "jobs", "show", trained.job_id) == 0
    job = json.loads(capsys.readouterr().out)
    registered = (job["state"], job["registeredVersion"], job["spec"]["registerModel"])
    assert registered == ("JOB_STATE_SUCCEEDED", "1", trained.model)


def test_watch_a_finished_job_replays_it_on_a_terminal(mesh, trained, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert cli(mesh, "jobs", "watch", trained.job_id) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    assert f"job {trained.job_id}" in out and "SUCCEEDED" in out and "epoch 8/8" in out
    assert f"registered {trained.model}:1" in out
    assert out.rstrip().splitlines()[-1].startswith(f"job {trained.job_id} SUCCEEDED: registered {trained.model}:1")


def test_logs_of_every_worker_and_of_one(mesh, trained, capsys):
    assert cli(mesh, "jobs", "logs", trained.job_id) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^==> task (\d) on (\S+) <==$", out, re.MULTILINE)
    assert [task for task, _ in headers] == ["0", "1"]
    assert len(out.splitlines()) > 4, out
    assert cli(mesh, "jobs", "logs", trained.job_id, "--task", "1", "--tail", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert 1 <= len(lines) <= 3 and not lines[0].startswith("==>")


def test_workers(mesh, trained, capsys):
    assert cli(mesh, "workers") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "HOST", "ADDRESS", "SLOTS", "USED", "JOBS"]
    rows = [line.split() for line in out[1:]]
    assert len(rows) == 2 and all(row[1] == "127.0.0.1" and row[3:5] == ["1", "0"] for row in rows), out
    assert cli(mesh, "--json", "workers") == 0
    assert len(json.loads(capsys.readouterr().out)["workers"]) == 2


def test_upload_sends_the_dataset_to_the_registry_then_cancel(mesh, tmp_path, capsys, unique):
    """dataset.upload (the older name of local_path): the trainer gets a blob digest. Three workers never fit on two
    slots, so the job waits (PENDING) until it is cancelled, and nothing trains."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["dataset"] = {**spec["dataset"], "upload": str(DIGITS_NPZ)}
    del spec["dataset"]["local_path"]
    spec.update(workers=3, register_model=unique("never"))
    path = tmp_path / "upload.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli(mesh, "jobs", "submit", str(path)) == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert "upload digits.npz: " in captured.err
    assert cli(mesh, "--json", "jobs", "show", job_id) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["spec"]["dataset"]["blobDigest"] == job["datasetDigest"] == file_digest(DIGITS_NPZ)
    assert job["state"] == "JOB_STATE_PENDING" and "waiting" in job["message"]

    assert cli(mesh, "jobs", "cancel", job_id) == 0
    assert capsys.readouterr().out == f"job {job_id}: CANCELLED\n"
    assert cli(mesh, "jobs", "watch", job_id) == 1
    assert capsys.readouterr().err.startswith(f"error: job {job_id} CANCELLED: ")
    assert cli(mesh, "jobs", "cancel", job_id) == 1
    assert capsys.readouterr().err.startswith("error: FAILED_PRECONDITION: ")


def test_spec_errors_exit_2_before_any_call(mesh, tmp_path, capsys):
    typo = write_spec(tmp_path, hyper_parameters={"epochz": 3})
    assert cli(mesh, "jobs", "submit", str(typo)) == 2
    assert capsys.readouterr().err == "error: unknown field hyper_parameters.epochz (did you mean epochs?)\n"

    top = write_spec(tmp_path, wokers=2)
    assert cli(mesh, "jobs", "submit", str(top)) == 2
    assert "unknown field wokers (did you mean workers?)" in capsys.readouterr().err

    wrong_type = write_spec(tmp_path, workers="two")
    assert cli(mesh, "jobs", "submit", str(wrong_type)) == 2
    assert "workers" in capsys.readouterr().err

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    assert cli(mesh, "jobs", "submit", str(bad_yaml)) == 2
    assert "not valid YAML" in capsys.readouterr().err

    assert cli(mesh, "jobs", "list", "--state", "SLEEPING") == 2
    assert "invalid state 'SLEEPING'" in capsys.readouterr().err


def test_server_side_failures_exit_1_with_the_status_code(mesh, tmp_path, capsys):
    unknown_recipe = write_spec(tmp_path, recipe="transformer")
    assert cli(mesh, "jobs", "submit", str(unknown_recipe)) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the data set's upload line
    assert err.startswith("error: INVALID_ARGUMENT: ") and "transformer" in err

    missing = write_spec(tmp_path)
    spec = yaml.safe_load(missing.read_text())
    spec["dataset"]["local_path"] = "no-such-file.npz"
    missing.write_text(yaml.safe_dump(spec))
    assert cli(mesh, "jobs", "submit", str(missing)) == 1  # a file of the user's: checked before any call
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"local_path {tmp_path / 'no-such-file.npz'} is not a file" in err

    for command in ("cancel", "show", "watch", "logs"):
        assert cli(mesh, "jobs", command, "no-such-job") == 1
        assert capsys.readouterr().err.startswith("error: NOT_FOUND: "), command

    assert cli(mesh, "jobs", "submit", str(tmp_path / "absent.yaml")) == 1
    assert "absent.yaml" in capsys.readouterr().err
