"""Generates Python messages, gRPC stubs and .pyi type stubs from the repository's protos/ into src/modelgrid/.

The code is imported by its proto path (`from modelgrid.registry.v1 import registry_pb2`); the Open Inference
Protocol's messages live at modelgrid/oip/ (their proto package stays `inference`, as on the wire). Only generated
directories are replaced: src/modelgrid/__init__.py and src/modelgrid/client/ are hand-written.

    python clients/python/generate_protos.py     # what `make protos` runs
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parent.parent / "protos"
PACKAGE = HERE / "src" / "modelgrid"
STAMP = PACKAGE / ".generated"
HAND_WRITTEN = {"__init__.py", "client", "py.typed", ".generated"}


def _proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate() -> None:
    protos = _proto_files()
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS}: build modelgrid-client from a checkout of the repository")
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}"]
        command += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, protos)]
        subprocess.run(command, check=True)
        generated = Path(out) / "modelgrid"
        for directory in [generated, *(p for p in generated.rglob("*") if p.is_dir())]:
            (directory / "__init__.py").touch()
        for entry in PACKAGE.iterdir() if PACKAGE.exists() else ():
            if entry.name not in HAND_WRITTEN and entry.is_dir():
                shutil.rmtree(entry)
        for entry in generated.iterdir():
            if entry.name not in HAND_WRITTEN:
                shutil.move(str(entry), PACKAGE / entry.name)
    STAMP.touch()


def generate_if_stale() -> None:
    protos = _proto_files()
    if not protos:  # an sdist or wheel build outside the repository: the generated code came with the sources
        return
    if STAMP.exists() and STAMP.stat().st_mtime >= max(p.stat().st_mtime for p in protos):
        return
    generate()


if __name__ == "__main__":
    generate()
