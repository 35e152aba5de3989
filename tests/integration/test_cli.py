"""The `modelgrid` CLI against a real registry subprocess (real Consul and Redis): push, pull, show, aliases,
paging, and the exit codes and messages of failures."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelgrid.client.artifacts import pack_to_file
from services.cli.main import run
from services.kit.localinfra import free_port
from services.kit.processes import REPO_ROOT, ServiceProcess

CLIENT_ID = "cli-test@pytest"
PAGE_CAP = 2  # the registry under test caps pages at 2 items, so every list of 3+ items spans several pages
REGISTRY_SETTINGS = {"MAX_PAGE_SIZE": str(PAGE_CAP)}  # for the `registry` fixture (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A real SavedModel: serving_default takes x float32 [batch, 4] and returns x * 2."""
    import tensorflow as tf

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return x * 2

    directory = tmp_path_factory.mktemp("doubler") / "model"
    module = Doubler()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


@pytest.fixture(autouse=True)
def cli_environment(monkeypatch, internal_tls_dir) -> None:
    """Output as when piped, whatever the environment says (FORCE_COLOR in CI would make rich draw for a tty). The
    services are called directly, over mTLS as `operator` (--tls-dir from MODELGRID_TLS_DIR)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("MODELGRID_TLS_DIR", str(internal_tls_dir))


def cli(registry: ServiceProcess, *args: str) -> int:
    """Runs the CLI in-process against the registry with a known client identity."""
    return run(["--target", registry.target, "--client-id", CLIENT_ID, *args])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def json_out(capsys) -> dict:
    captured = capsys.readouterr()
    return json.loads(captured.out)


def test_push_savedmodel_then_pull_restores_every_byte(registry, saved_model, tmp_path, capsys):
    expected_digest = pack_to_file(saved_model, tmp_path / "expected.tar")

    assert cli(registry, "push", "doubler", str(saved_model), "--metric", "accuracy=0.97") == 0
    pushed = capsys.readouterr()
    assert "pushed doubler:1" in pushed.out
    assert f"digest {expected_digest}" in pushed.out
    assert pushed.err.startswith("push doubler: ")  # the transfer summary (stderr is not a terminal here)

    pulled_dir = tmp_path / "pulled"
    assert cli(registry, "pull", "doubler:1", str(pulled_dir)) == 0
    pulled = capsys.readouterr()
    assert "pulled doubler:1" in pulled.out
    assert f"digest {expected_digest} verified" in pulled.out

    original = tree_bytes(saved_model)
    assert "saved_model.pb" in original
    assert tree_bytes(pulled_dir) == original

    import tensorflow as tf

    serve = tf.saved_model.load(str(pulled_dir)).signatures["serving_default"]
    result = serve(x=tf.constant([[1.0, 2.0, 3.0, 4.0]]))
    np.testing.assert_allclose(next(iter(result.values())).numpy(), [[2.0, 4.0, 6.0, 8.0]])


def test_progress_bar_on_a_terminal(registry, saved_model, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert cli(registry, "push", "bar-model", str(saved_model)) == 0
    captured = capsys.readouterr()
    assert "pushed bar-model:1" in captured.out
    final_frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", captured.err).split("\r")[-1]
    assert final_frame.startswith("push bar-model ━")
    assert re.search(r" (\d[\d.,]*)/\1 ", final_frame), final_frame  # every byte counted: done == total


def test_versions_show_prints_signature_and_metadata(registry, saved_model, capsys):
    args = ["--metric", "accuracy=0.97", "--param", "lr=0.01", "--tag", "team=vision", "--description", "doubles"]
    assert cli(registry, "push", "sig-model", str(saved_model), *args) == 0
    capsys.readouterr()

    assert cli(registry, "versions", "show", "sig-model:1") == 0
    shown = capsys.readouterr().out
    assert "serving_default" in shown
    assert "x: float32 [?, 4]" in shown
    assert "output_0: float32 [?, 4]" in shown
    assert "accuracy=0.97" in shown and "lr=0.01" in shown and "team=vision" in shown
    assert re.search(rf"^created by +{re.escape(CLIENT_ID)} *$", shown, re.MULTILINE)

    assert cli(registry, "versions", "show", "sig-model", "1") == 0  # NAME V is the same version
    assert capsys.readouterr().out == shown
    assert cli(registry, "versions", "show", "sig-model") == 0  # NAME alone: the latest READY version
    assert capsys.readouterr().out == shown

    assert cli(registry, "--json", "versions", "show", "sig-model:1") == 0
    version = json_out(capsys)
    assert version["artifact"]["format"] == "ARTIFACT_FORMAT_SAVEDMODEL_TAR"
    assert version["metrics"] == {"accuracy": 0.97}
    assert version["params"] == {"lr": "0.01"}
    [signature] = version["signatures"]
    assert signature["name"] == "serving_default"
    [x] = signature["inputs"]
    assert (x["name"], x["dtype"], x["shape"]) == ("x", "DATA_TYPE_FLOAT32", ["-1", "4"])

    assert cli(registry, "versions", "show", "sig-model:1", "1") == 2  # the version given twice
    assert "give the version once" in capsys.readouterr().err


def test_alias_compare_and_set_and_history(registry, saved_model, capsys):
    for _ in range(2):
        assert cli(registry, "push", "aliased", str(saved_model)) == 0
    capsys.readouterr()

    assert cli(registry, "alias", "set", "aliased", "production", "1", "--expect", "0") == 0
    assert capsys.readouterr().out == "aliased@production: unset -> 1\n"

    assert cli(registry, "alias", "set", "aliased", "production", "2", "--expect", "0") == 1
    failed = capsys.readouterr()
    assert failed.err.startswith("error: FAILED_PRECONDITION: ")
    assert "Traceback" not in failed.err and failed.out == ""
    assert cli(registry, "models", "show", "aliased", "--json") == 0
    assert json_out(capsys)["aliases"] == {"production": "1"}  # the lost compare-and-set changed nothing

    assert cli(registry, "alias", "set", "aliased", "production", "2", "--expect", "1") == 0
    assert capsys.readouterr().out == "aliased@production: 1 -> 2\n"
    assert cli(registry, "alias", "rm", "aliased", "production") == 0
    assert capsys.readouterr().out == "removed aliased@production (was 2)\n"

    assert cli(registry, "--json", "history", "aliased", "--alias", "production") == 0
    events = json_out(capsys)["events"]  # 3 events over 2 pages: the failed set recorded nothing
    assert [(e["type"], e["version"], e["previousVersion"]) for e in events] == [
        ("EVENT_TYPE_ALIAS_SET", "1", "0"),
        ("EVENT_TYPE_ALIAS_SET", "2", "1"),
        ("EVENT_TYPE_ALIAS_DELETED", "0", "2"),
    ]
    assert {e["actor"] for e in events} == {CLIENT_ID}

    assert cli(registry, "history", "aliased") == 0
    table = capsys.readouterr().out
    assert table.count("VERSION_CREATED") == 2 and "MODEL_CREATED" in table and "ALIAS_DELETED" in table


def test_push_raw_file_with_alias_then_pull_by_alias(registry, tmp_path, capsys):
    data = np.random.default_rng(3).bytes(300_000)
    source = tmp_path / "table.bin"
    source.write_bytes(data)

    assert cli(registry, "push", "raw-data", str(source), "--alias", "staging") == 0
    out = capsys.readouterr().out
    assert "pushed raw-data:1" in out and "RAW" in out
    assert "alias raw-data@staging -> 1" in out

    assert cli(registry, "pull", "raw-data@staging", str(tmp_path / "out")) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "artifact").read_bytes() == data

    assert cli(registry, "versions", "list", "raw-data", "--json") == 0
    [version] = json_out(capsys)["versions"]
    assert version["aliases"] == ["staging"]
    assert version["artifact"]["format"] == "ARTIFACT_FORMAT_RAW"
    assert version["artifact"]["sizeBytes"] == str(len(data))


def test_models_list_follows_pages_and_filters(registry, capsys):
    names = [f"listed-{letter}" for letter in "abcde"]
    for index, name in enumerate(names):
        assert cli(registry, "models", "create", name, "--tag", f"tier={'gold' if index % 2 else 'free'}") == 0
    assert capsys.readouterr().out == "".join(f"created model {name}\n" for name in names)

    assert cli(registry, "models", "list", "--prefix", "listed-", "--json") == 0
    assert [model["name"] for model in json_out(capsys)["models"]] == names  # 5 models, pages of 2

    assert cli(registry, "models", "list", "--prefix", "listed-", "--tag", "tier=gold", "--json") == 0
    assert [model["name"] for model in json_out(capsys)["models"]] == ["listed-b", "listed-d"]

    assert cli(registry, "models", "list", "--prefix", "listed-") == 0
    table = capsys.readouterr().out
    assert all(name in table for name in names) and "tier=gold" in table

    assert cli(registry, "models", "create", "listed-a") == 1
    assert capsys.readouterr().err.startswith("error: ALREADY_EXISTS: ")


def test_versions_list_newest_first(registry, tmp_path, capsys):
    for index in range(3):
        source = tmp_path / f"v{index}.bin"
        source.write_bytes(f"payload {index}".encode())
        assert cli(registry, "push", "listed-versions", str(source)) == 0
    capsys.readouterr()

    assert cli(registry, "--json", "versions", "list", "listed-versions") == 0
    assert [v["version"] for v in json_out(capsys)["versions"]] == ["3", "2", "1"]


def test_pull_of_unknown_model_exits_1_with_not_found(registry, tmp_path, capsys):
    target_dir = tmp_path / "nothing"
    assert cli(registry, "pull", "no-such-model", str(target_dir)) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: NOT_FOUND: ")
    assert "Traceback" not in captured.err
    assert not target_dir.exists()  # no empty directory left behind

    assert cli(registry, "versions", "show", "no-such-model:1") == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_bad_usage_exits_2_and_a_bad_path_exits_1_before_creating_anything(registry, tmp_path, capsys):
    assert cli(registry, "push") == 2
    assert cli(registry, "alias", "set", "m", "production", "one") == 2
    assert cli(registry, "push", "m", str(tmp_path), "--metric", "accuracy=high") == 2
    assert cli(registry, "models", "show", "bad..name") == 2
    assert cli(registry, "alias", "set", "m", "Prod", "1") == 2
    assert "invalid alias 'Prod'" in capsys.readouterr().err

    (tmp_path / "notes.txt").write_text("not a model")
    assert cli(registry, "push", "never-created", str(tmp_path)) == 1
    assert "not a SavedModel" in capsys.readouterr().err
    assert cli(registry, "push", "never-created", str(tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(registry, "models", "show", "never-created") == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_installed_console_script(registry, capsys):
    script = Path(sys.executable).parent / "modelgrid"
    assert script.is_file(), "pip install -e . did not install the modelgrid console script"
    assert cli(registry, "models", "create", "from-script") == 0
    capsys.readouterr()

    result = subprocess.run(
        [str(script), "--target", registry.target, "models", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "from-script" in [model["name"] for model in json.loads(result.stdout)["models"]]

    nothing_listens = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "MODELGRID_TARGET": nothing_listens}
    result = subprocess.run(
        [str(script), "models", "list"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert nothing_listens in result.stderr and "Traceback" not in result.stderr
