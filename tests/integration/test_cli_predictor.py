"""The `modelgrid` predictor commands (predict, batch, serving) in-process against a real registry and one real
predictor subprocess (own Consul, shared Redis), their results checked against TensorFlow called directly."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from modelgrid.registry.v1 import registry_pb2 as rpb
from services.cli.main import run
from services.kit.localinfra import ConsulAgent

pytestmark = pytest.mark.slow

CLIENT_ID = "cli-predictor-test@pytest"
X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.7, 2.2], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, unique, build_saved_model, tf_reference):
    """Own Consul (the predictor finds only this registry), a registry, one model with version 1 at production and
    an unserved second model, and one predictor serving name@production."""
    tmp = tmp_path_factory.mktemp("cli-predictor")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        name, spare = unique("cli"), unique("spare")
        path = build_saved_model(tmp / "model", seed=3)
        for model in (name, spare):
            client.ensure_model(model)
            client.push_savedmodel(model, path)
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=name, alias="production", version=1))
        predictor = launch.predictor(
            consul.http_url, redis_server.url, tmp, [{"name": name, "aliases": ["production"]}], MAX_QUEUE_DELAY_MS="1"
        )
        try:
            yield SimpleNamespace(
                registry=registry.target,
                predictor=predictor.target,
                name=name,
                spare=spare,
                reference=tf_reference(path),
                tls_dir=internal_tls_dir,
            )
        finally:
            predictor.stop()
            channel.close()
            registry.stop()


@pytest.fixture(autouse=True)
def cli_environment(monkeypatch, internal_tls_dir) -> None:
    """Output as when piped, whatever the environment says. The services are
    called directly, over mTLS as `operator` (--tls-dir from MODELGRID_TLS_DIR)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("MODELGRID_TLS_DIR", str(internal_tls_dir))


def cli(mesh, *args: str) -> int:
    # --tls-dir given here: module-scoped fixtures call this before the autouse environment applies
    return run(
        ["--tls-dir", str(mesh.tls_dir), "--target", mesh.registry, "--predictor", mesh.predictor]
        + ["--client-id", CLIENT_ID, *args]
    )


def predicted(capsys) -> tuple[int, np.ndarray]:
    """(version, y) of `predict --json` output."""
    answer = json.loads(capsys.readouterr().out)
    return answer["version"], np.array(answer["outputs"]["y"], dtype=np.float32)


def test_predict_from_json_as_a_bare_list_and_as_an_object(mesh, tmp_path, capsys):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(X.tolist()))  # JSON numbers: cast to the signature's float32
    assert cli(mesh, "predict", f"{mesh.name}@production", "--input", str(bare), "--json") == 0
    version, y = predicted(capsys)
    assert version == 1
    np.testing.assert_allclose(y, mesh.reference(X), rtol=1e-6)

    named = tmp_path / "named.json"
    named.write_text(json.dumps({"x": [[1, 2, 3, 4]]}))  # integers too
    assert cli(mesh, "predict", f"{mesh.name}:1", "--input", str(named)) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"answered by {mesh.name}:1\ny: float32 [1, 3]\n")
    expected = mesh.reference(np.array([[1, 2, 3, 4]], dtype=np.float32))[0]
    row = shown.splitlines()[-1].split()  # the table's one row: index, then the 3 values
    assert row[0] == "0"
    np.testing.assert_allclose([float(v) for v in row[1:]], expected, rtol=1e-5)


def test_predict_from_npy_and_npz_writes_all_outputs(mesh, tmp_path, capsys):
    np.save(tmp_path / "x.npy", X)
    out_npz = tmp_path / "out" / "y.npz"
    assert cli(mesh, "predict", mesh.name, "--input", str(tmp_path / "x.npy"), "--output", str(out_npz)) == 0
    assert f"wrote the outputs to {out_npz}" in capsys.readouterr().out
    with np.load(out_npz) as outputs:
        assert outputs.files == ["y"]
        np.testing.assert_allclose(outputs["y"], mesh.reference(X), rtol=1e-6)

    many = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "many.npz", x=many)
    out_json = tmp_path / "y.json"
    args = ["--input", str(tmp_path / "many.npz"), "--output-filter", "y", "--output", str(out_json)]
    assert cli(mesh, "predict", f"{mesh.name}@production", *args) == 0
    shown = capsys.readouterr().out
    assert "y: float32 [40, 3]" in shown and "... 35 more rows" in shown  # too big for a table: a preview
    written = json.loads(out_json.read_text())
    assert (written["model_name"], written["version"]) == (mesh.name, 1)
    np.testing.assert_allclose(np.array(written["outputs"]["y"]), mesh.reference(many), rtol=1e-6)


def test_batch_submit_wait_then_status_list_and_fetch(mesh, tmp_path, capsys):
    data = np.random.default_rng(2).normal(size=(700, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=data)
    args = ["--input", str(tmp_path / "data.npz"), "--batch-size", "64", "--wait"]
    assert cli(mesh, "batch", "submit", f"{mesh.name}@production", *args) == 0
    submitted = capsys.readouterr()
    match = re.search(rf"^job (\S+) succeeded: 700 records on {mesh.name}:1$", submitted.out, re.MULTILINE)
    assert match, submitted.out
    job_id = match.group(1)
    assert re.search(r"^results [0-9a-f]{64}$", submitted.out, re.MULTILINE)
    assert f"job {job_id}: 700/700 records in " in submitted.err  # the progress summary (not a terminal)

    assert cli(mesh, "batch", "status", job_id, "--json") == 0
    job = json.loads(capsys.readouterr().out)
    done = ("BATCH_JOB_STATE_SUCCEEDED", "700", "700", "1")
    assert (job["state"], job["doneRecords"], job["totalRecords"], job["version"]) == done
    assert cli(mesh, "batch", "status", job_id) == 0
    assert re.search(r"^records +700/700$", capsys.readouterr().out, re.MULTILINE)
    assert cli(mesh, "batch", "list", "--json") == 0
    assert job_id in [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]]

    results = tmp_path / "results.npz"
    assert cli(mesh, "batch", "fetch", job_id, str(results)) == 0
    assert f"fetched the results of job {job_id} into {results}" in capsys.readouterr().out
    assert not (tmp_path / "results.npz.part").exists()
    with np.load(results) as fetched:
        np.testing.assert_allclose(fetched["y"], mesh.reference(data), rtol=1e-5)


def test_batch_progress_bar_on_a_terminal(mesh, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    np.savez(tmp_path / "data.npz", x=X)
    assert cli(mesh, "batch", "submit", mesh.name, "--input", str(tmp_path / "data.npz"), "--wait") == 0
    final_frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err).split("\r")[-1]
    assert re.search(r"^job \S+ ━+ 3/3 ", final_frame), final_frame


def test_serving_list_load_and_unload(mesh, capsys):
    assert cli(mesh, "serving", "list") == 0
    table = capsys.readouterr().out
    assert re.search(rf"^{mesh.name} +aliases production +1 +AVAILABLE +production ", table, re.MULTILINE), table
    assert mesh.spare not in table

    assert cli(mesh, "serving", "load", mesh.spare, "--versions", "1") == 0
    assert re.search(r"^versions +1 AVAILABLE$", capsys.readouterr().out, re.MULTILINE)
    assert cli(mesh, "--json", "serving", "list") == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert models[mesh.spare]["policy"]["specific"] == {"versions": ["1"]}
    assert [v["state"] for v in models[mesh.spare]["versions"]] == ["VERSION_STATE_AVAILABLE"]
    assert [i["name"] for i in models[mesh.name]["inputs"]] == ["x"]

    assert cli(mesh, "serving", "unload", mesh.spare) == 0
    assert capsys.readouterr().out == f"stopped serving {mesh.spare}\n"
    assert cli(mesh, "serving", "show", mesh.spare) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_failures_exit_1_with_the_status_code(mesh, tmp_path, capsys):
    good = tmp_path / "x.json"
    good.write_text(json.dumps(X.tolist()))
    assert cli(mesh, "predict", "no-such-model", "--input", str(good)) == 1
    failed = capsys.readouterr()
    assert failed.err.startswith("error: NOT_FOUND: ") and failed.out == "" and "Traceback" not in failed.err

    wrong_shape = tmp_path / "wrong.json"
    wrong_shape.write_text(json.dumps({"x": [[1.0, 2.0, 3.0]]}))  # 3 columns, the signature says 4
    assert cli(mesh, "predict", mesh.name, "--input", str(wrong_shape)) == 1
    failed = capsys.readouterr()
    assert failed.err.startswith("error: INVALID_ARGUMENT: ") and "[1, 3]" in failed.err

    ragged = tmp_path / "ragged.json"
    ragged.write_text("[[1, 2, 3, 4], [1, 2]]")
    assert cli(mesh, "predict", mesh.name, "--input", str(ragged)) == 1
    assert "not a rectangular array" in capsys.readouterr().err

    assert cli(mesh, "predict", mesh.name, "--input", str(tmp_path / "x.csv")) == 2  # bad usage: the suffix
    assert "expected a .json, .npy or .npz file" in capsys.readouterr().err
    assert cli(mesh, "batch", "fetch", "no-such-job", str(tmp_path / "r.npz")) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")
