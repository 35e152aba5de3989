"""Reads the serving signatures out of a SavedModel packed as a tar, without loading the model."""

import tarfile
from pathlib import Path
from typing import BinaryIO

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.registry.types import Signature, TensorSpec
from modelgrid.client.tensors import BY_TF
from modelgrid.savedmodel.v1 import savedmodel_pb2

_MAX_GRAPH_BYTES = 512 * 1024 * 1024


def read_signatures(tar: str | Path | BinaryIO) -> list[Signature]:
    """The signature defs of the "serve" meta graph of a SavedModel tar (a path or a seekable binary file), sorted
    by name.

    Raises InvalidArgument when the tar is not a SavedModel. Parses with the project's subset of TensorFlow's
    SavedModel messages (protos/modelgrid/savedmodel/v1): no TensorFlow import.
    """
    try:
        opened = tarfile.open(tar, mode="r:") if isinstance(tar, str | Path) else tarfile.open(fileobj=tar, mode="r:")
        with opened as archive:
            member = next((m for m in archive.getmembers() if m.name.lstrip("./") == "saved_model.pb"), None)
            if member is None or not member.isfile():
                raise InvalidArgument("artifact declared as a SavedModel tar has no saved_model.pb at its root")
            if member.size > _MAX_GRAPH_BYTES:
                raise InvalidArgument("saved_model.pb is larger than 512 MiB")
            data = archive.extractfile(member).read()
    except tarfile.TarError as exc:
        raise InvalidArgument(f"artifact declared as a SavedModel tar is not a readable tar: {exc}") from None
    saved_model = savedmodel_pb2.SavedModel()
    try:
        saved_model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError depending on the backend
        raise InvalidArgument("saved_model.pb in the artifact is not a valid SavedModel protobuf") from None
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        return []
    meta_graph = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])
    signatures = []
    for key in sorted(meta_graph.signature_def):
        if key.startswith("__"):  # e.g. __saved_model_init_op
            continue
        sig = meta_graph.signature_def[key]
        signatures.append(
            Signature(
                name=key,
                method_name=sig.method_name,
                inputs=[_tensor_spec(name, info) for name, info in sorted(sig.inputs.items())],
                outputs=[_tensor_spec(name, info) for name, info in sorted(sig.outputs.items())],
            )
        )
    return signatures


def _tensor_spec(name: str, info) -> TensorSpec:
    shape = info.tensor_shape
    return TensorSpec(
        name=name,
        dtype=BY_TF[info.dtype].name if info.dtype in BY_TF else f"tf_dtype_{info.dtype}",
        shape=[int(d.size) for d in shape.dim],
        unknown_rank=bool(shape.unknown_rank),
    )
