"""Shell completion scripts generated from the parser: what bash completes at each point of a command line (bash
runs the generated function), and the same tables in the zsh script."""

import shutil
import subprocess

import pytest

from services.cli import completion
from services.cli.main import build_parser, run

SIMULATE = """
source "$1"
read -ra COMP_WORDS <<< "$2"
[[ "$2" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_modelgrid
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "modelgrid.bash"
    path.write_text(completion.script(build_parser(), "bash"))
    return path


def completions(script, line: str) -> list[str]:
    """What bash offers for `line` (a trailing space: a new word) with the generated script."""
    result = subprocess.run(
        ["bash", "--norc", "-c", SIMULATE, "_", str(script), line], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [word for word in result.stdout.splitlines() if word]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("modelgrid ca", ["canary"]),
        ("modelgrid canary ", ["rollback", "set", "show"]),
        ("modelgrid --target 127.0.0.1:1 --json k", ["keys"]),  # an option's value is not taken for a command
        ("modelgrid keys ", ["create", "list", "revoke"]),
        ("modelgrid keys create --scope ", ["read", "predict", "train", "admin"]),
        ("modelgrid keys create --sc", ["--scope"]),
        ("modelgrid completion ", ["bash", "zsh"]),
        ("modelgrid models delete digits --y", ["--yes"]),
        ("modelgrid tags set digits a=b --vers", ["--version"]),
        ("modelgrid --pro", ["--profile"]),
        ("modelgrid models show ", []),  # a model name: nothing known, bash falls back to file names
        ("modelgrid --ca ", []),  # a file
    ],
)
def test_bash_completes_commands_options_and_choices(bash_script, line, expected):
    assert completions(bash_script, line) == expected


def test_every_command_and_option_of_the_parser_is_in_the_tables():
    tables = completion.tables(build_parser())
    assert set(tables.commands["modelgrid"]) >= {"canary", "keys", "tags", "models", "completion", "push", "jobs"}
    assert tables.commands["modelgrid models"] == ["create", "delete", "list", "show", "update"]
    options = tables.options["modelgrid canary set"]
    assert {"--tls", "--no-tls", "--ca", "--profile", "--config", "--json"} <= set(options)
    assert "--json" not in tables.valued["modelgrid canary set"] and "--ca" in tables.valued["modelgrid canary set"]


def test_zsh_script_holds_the_same_tables():
    script = completion.script(build_parser(), "zsh")
    assert script.startswith("#compdef modelgrid\n")
    assert "_modelgrid_commands=(modelgrid 'alias batch canary completion" in script
    assert "'modelgrid keys create --scope' 'read predict train admin'" in script


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_parses_the_script(tmp_path):
    path = tmp_path / "_modelgrid"
    path.write_text(completion.script(build_parser(), "zsh"))
    result = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_completion_command_needs_no_connection_or_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELGRID_CONFIG", str(tmp_path / "missing.toml"))  # would be an error for any call
    assert run(["completion", "bash"]) == 0
    assert capsys.readouterr().out.endswith("complete -o default -F _modelgrid modelgrid\n")
    assert run(["completion", "fish"]) == 2
