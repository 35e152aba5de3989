"""Python client of the registry for programs and the CLI: push and pull artifacts with digests checked end to end.

with grpc.insecure_channel("127.0.0.1:50051") as channel:
    client = RegistryClient(channel)
    version = client.push_savedmodel("mnist", "export/1", metrics={"accuracy": 0.97})
    client.pull("mnist@production", "models/mnist")
"""

import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.kit.artifacts import CHUNK_BYTES, file_digest, pack_to_file, read_chunks, unpack
from services.kit.modelref import ModelRef

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class DigestMismatch(Exception):
    """Downloaded bytes do not hash to the digest the registry announced."""


def ref_message(ref: str | ModelRef) -> common_pb2.ModelRef:
    """A ModelRef message from "name", "name:3" or "name@alias"."""
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    if ref.version:
        return common_pb2.ModelRef(name=ref.name, version=ref.version)
    if ref.alias:
        return common_pb2.ModelRef(name=ref.name, alias=ref.alias)
    return common_pb2.ModelRef(name=ref.name)


class RegistryClient:
    """Blocking client over a grpc channel; every RPC is also reachable as `client.stub`."""

    def __init__(self, channel: grpc.Channel, *, client_id: str = "", chunk_bytes: int = CHUNK_BYTES) -> None:
        self.stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self._metadata = (("x-modelgrid-client", client_id),) if client_id else ()
        self._chunk_bytes = chunk_bytes

    def ensure_model(self, name: str, description: str = "") -> pb.RegisteredModel:
        """Creates the model unless it exists; returns it."""
        try:
            return self.stub.CreateModel(
                pb.CreateModelRequest(name=name, description=description), metadata=self._metadata
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return self.stub.GetModel(pb.GetModelRequest(name=name), metadata=self._metadata)

    def push_file(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        artifact_format: int = pb.ARTIFACT_FORMAT_RAW,
        digest: str = "",
        request_id: str = "",
        progress: Progress | None = None,
        timeout: float | None = None,
        **metadata,
    ) -> pb.ModelVersion:
        """Uploads a file as a new version of `name` (the model must exist). `metadata` takes VersionMetadata
        fields (description, metrics, params, tags, lineage). A request id makes retries idempotent; one is
        generated when none is given."""
        size = Path(path).stat().st_size
        meta = pb.VersionMetadata(
            model_name=name,
            artifact_digest=digest or file_digest(path),
            artifact_size=size,
            artifact_format=artifact_format,
            request_id=request_id or uuid.uuid4().hex,
            **metadata,
        )

        def messages() -> Iterator[pb.CreateVersionRequest]:
            yield pb.CreateVersionRequest(metadata=meta)
            done = 0
            for chunk in read_chunks(path, self._chunk_bytes):
                done += len(chunk)
                yield pb.CreateVersionRequest(chunk=chunk)
                if progress:
                    progress(done, size)

        return self.stub.CreateVersion(messages(), metadata=self._metadata, timeout=timeout)

    def push_savedmodel(self, name: str, directory: str | os.PathLike, **kwargs) -> pb.ModelVersion:
        """Packs a SavedModel directory as a deterministic tar and uploads it as a new version."""
        with tempfile.TemporaryDirectory(prefix="modelgrid-push-") as tmp:
            tar_path = Path(tmp) / "model.tar"
            digest = pack_to_file(directory, tar_path)
            return self.push_file(
                name, tar_path, artifact_format=pb.ARTIFACT_FORMAT_SAVEDMODEL_TAR, digest=digest, **kwargs
            )

    def download(
        self, ref: str | ModelRef, dest: str | os.PathLike, *, progress: Progress | None = None
    ) -> pb.ArtifactHeader:
        """Downloads a version's artifact into the file `dest`, resuming from what `dest` already holds, and
        checks the digest over the whole file. Raises DigestMismatch (and removes `dest`) when it does not match."""
        return self._download(
            lambda offset: self.stub.DownloadArtifact(
                pb.DownloadArtifactRequest(ref=ref_message(ref), offset=offset), metadata=self._metadata
            ),
            Path(dest),
            progress,
        )

    def upload_blob(self, path: str | os.PathLike, *, digest: str = "") -> pb.BlobInfo:
        """Stores a file that is not a model version (a data set) and returns its digest and size."""
        size = Path(path).stat().st_size

        def messages() -> Iterator[pb.UploadBlobRequest]:
            yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest or file_digest(path), size_bytes=size))
            for chunk in read_chunks(path, self._chunk_bytes):
                yield pb.UploadBlobRequest(chunk=chunk)

        return self.stub.UploadBlob(messages(), metadata=self._metadata)

    def download_blob(
        self, digest: str, dest: str | os.PathLike, *, progress: Progress | None = None
    ) -> pb.ArtifactHeader:
        """Downloads a blob by digest into `dest` (resuming), verified like `download`."""
        return self._download(
            lambda offset: self.stub.DownloadBlob(
                pb.DownloadBlobRequest(digest=digest, offset=offset), metadata=self._metadata
            ),
            Path(dest),
            progress,
        )

    def _download(
        self, open_stream: Callable[[int], Iterator[pb.DownloadArtifactResponse]], dest: Path, progress: Progress | None
    ) -> pb.ArtifactHeader:
        offset = dest.stat().st_size if dest.exists() else 0
        header = None
        with dest.open("ab") as out:
            for message in open_stream(offset):
                if message.WhichOneof("payload") == "header":
                    header = message.header
                    continue
                out.write(message.chunk)
                offset += len(message.chunk)
                if progress and header is not None:
                    progress(offset, header.artifact.size_bytes)
        if header is None:
            raise DigestMismatch("the registry sent no header")
        if file_digest(dest) != header.artifact.digest:
            dest.unlink()
            raise DigestMismatch(f"{dest} does not hash to {header.artifact.digest}; removed it")
        return header

    def pull(
        self, ref: str | ModelRef, directory: str | os.PathLike, *, progress: Progress | None = None
    ) -> pb.ArtifactHeader:
        """Downloads a version and unpacks it into `directory` (a SavedModel tar) or writes it there as
        `artifact` (raw bytes)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="modelgrid-pull-", dir=directory.parent) as tmp:
            blob = Path(tmp) / "artifact"
            header = self.download(ref, blob, progress=progress)
            if header.artifact.format == pb.ARTIFACT_FORMAT_SAVEDMODEL_TAR:
                unpack(blob, directory)
            else:
                os.replace(blob, directory / "artifact")
        return header


def bytes_digest(data: bytes) -> str:
    """sha256 (hex) of in-memory bytes."""
    return hashlib.sha256(data).hexdigest()
