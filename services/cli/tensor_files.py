"""Tensor files of the command line: inputs read from .json, .npy or .npz files and outputs written to .json or
.npz, checked against a model's signature where JSON needs a dtype."""

import json
import zipfile
from pathlib import Path

import numpy as np

from modelgrid.client.tensors import BY_PROTO
from modelgrid.common.v1 import common_pb2
from services.cli import predictor_views as views
from services.cli.registry_commands import CommandError


def read_npz(path: Path, names_only: bool = False) -> dict[str, np.ndarray | None]:
    """The arrays of an NPZ file by name (or only their names, each mapped to None, without reading them)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: None if names_only else data[name] for name in data.files}
    except (ValueError, TypeError, zipfile.BadZipFile):  # a .npy, a pickle or text under an .npz name, ...
        raise CommandError(f"{path}: not an NPZ file of arrays (np.savez; Python objects are refused)") from None


def read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError:
        raise CommandError(f"{path}: not an NPY file of an array (np.save; Python objects are refused)") from None


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: not valid JSON ({exc})") from None


def json_array(spec: common_pb2.TensorSpec, value: object) -> np.ndarray:
    """JSON numbers (or strings) as an array of the signature's dtype; refuses values the dtype cannot hold."""
    element = BY_PROTO.get(spec.dtype)
    what = f"input {spec.name!r}"
    if element is not None and element.name == "string":
        array = np.array(value, dtype=object)
        if not all(isinstance(item, str) for item in array.reshape(-1)):
            raise CommandError(f"{what}: expected strings (nested lists of equal lengths)")
        return np.vectorize(str.encode, otypes=[object])(array) if array.size else array
    if element is None or element.numpy is None:
        raise CommandError(f"{what}: its element type cannot be given in JSON; use a .npy or .npz file")
    try:
        parsed = np.array(value)
    except ValueError as exc:  # ragged lists
        raise CommandError(f"{what}: not a rectangular array ({exc})") from None
    if parsed.dtype.kind not in "biuf":
        raise CommandError(f"{what}: expected numbers for {element.name} (nested lists of equal lengths)")
    with np.errstate(all="ignore"):
        array = parsed.astype(element.numpy)
    if element.numpy.kind in "biu" and not np.array_equal(array, parsed):
        raise CommandError(f"{what}: values do not fit {element.name}")
    return array


def write_outputs(path: Path, model: str, version: int, outputs: dict[str, np.ndarray]) -> None:
    """All of the outputs: one array each in an .npz, or the `predict --json` object in a .json file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(views.prediction_json(model, version, outputs)) + "\n")
        return
    plain = {name: array.astype(bytes) if array.dtype.kind == "O" else array for name, array in outputs.items()}
    with path.open("wb") as file:
        np.savez(file, **plain)
