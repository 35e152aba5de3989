"""Training worker process: what it needs before TensorFlow (the spec it runs is services.clients.agent.WorkerSpec).

The trainer's agents spawn `python -m services.trainer.worker --spec spec.json` once per task, with TF_CONFIG
naming the group's host:port list and this task's index, and MODELGRID_PROGRESS_FILE naming a JSON-lines file
that receives the progress events (services.trainer.progress). It exits with a services.trainer.exit_codes code.
The trainer sends the spec without paths; the agent sets them to its own directories (its cached copy of the data
set, the replica's checkpoint and export dirs) and writes it with `WorkerSpec.to_json`; the worker reads it with
`WorkerSpec.from_json`. Every path a worker sees is on its own host.
"""

from pathlib import Path


class InvalidJob(Exception):
    """The recipe or the dataset cannot be used as the spec asks (ExitCode.INVALID_SPEC: a restart would fail the
    same way)."""


BUILTIN_RECIPE_NAMES = ("mlp", "cnn")
FILE_PREFIX = "file:"
"""A recipe named `file:<path>` is the module at that path relative to recipes_dir."""


def resolve_recipe_file(relative: str, recipes_dir: str | Path | None) -> Path:
    """The real path of a user recipe, refused (ValueError) unless it is a .py file inside recipes_dir.

    Symlinks are resolved before the check, so a link that points outside the directory is refused too.
    """
    if not recipes_dir:
        raise ValueError("recipe: a file recipe needs recipes_dir to be configured")
    if not relative or Path(relative).is_absolute():
        raise ValueError(f"recipe: {relative!r} must be a path relative to the recipes directory")
    base = Path(recipes_dir).resolve(strict=False)
    target = (base / relative).resolve(strict=False)
    if not target.is_relative_to(base):
        raise ValueError(f"recipe: {relative!r} resolves outside the recipes directory")
    if target.suffix != ".py" or not target.is_file():
        raise ValueError(f"recipe: {relative!r} is not a .py file in the recipes directory")
    return target
