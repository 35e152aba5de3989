"""Blocking client of the registry for programs, benches and the CLI: push and pull artifacts with digests checked
end to end. Typed methods return the registry's dataclasses and raise the kit's domain errors; `stub` reaches every
other RPC with the client's identity in `metadata`.

with grpc.insecure_channel("127.0.0.1:50051") as channel:
    client = RegistryClient(channel)
    version = client.push_savedmodel("mnist", "export/1", metrics={"accuracy": 0.97})
    client.pull("mnist@production", "models/mnist")
"""

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from modelgrid.client.artifacts import CHUNK_BYTES, file_digest, pack_to_file, read_chunks, unpack
from modelgrid.client.convert import ref_to_pb
from modelgrid.client.errors import Aborted, AlreadyExists, DataLoss, Unavailable
from modelgrid.client.modelref import ModelRef
from modelgrid.client.registry import convert
from modelgrid.client.registry.types import (
    Alias,
    ArtifactFormat,
    Blob,
    Download,
    Lineage,
    ModelVersion,
    RegisteredModel,
    VersionStatus,
)
from modelgrid.client.rpc_errors import rpc_errors
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
SERVICE = "registry"
TIMEOUT = 30.0
"""Deadline of each metadata call, in seconds."""
PAGE_SIZE = 1000
RESUME_SECONDS = 120.0
"""How long an upload that lost its connection keeps trying to resume (a registry that notices a vanished client
only by its keepalive holds the cut upload for some 15 s: ABORTED until then)."""
RESUME_BACKOFF_SECONDS = 0.5
"""Wait before the first new try; doubled for each later one (at most 5 s)."""


class RegistryClient:
    """Blocking registry client over a grpc channel."""

    def __init__(self, channel: grpc.Channel, *, client_id: str = "", chunk_bytes: int = CHUNK_BYTES) -> None:
        self.stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self.metadata = (("x-modelgrid-client", client_id),) if client_id else ()
        self._chunk_bytes = chunk_bytes

    def ensure_model(self, name: str, description: str = "") -> RegisteredModel:
        """Creates the model unless it exists; returns it."""
        try:
            with rpc_errors(SERVICE):
                reply = self.stub.CreateModel(
                    pb.CreateModelRequest(name=name, description=description), metadata=self.metadata
                )
        except AlreadyExists:
            with rpc_errors(SERVICE):
                reply = self.stub.GetModel(pb.GetModelRequest(name=name), metadata=self.metadata)
        return convert.model_from_pb(reply)

    def _call(self, method: Callable, request, timeout: float | None = TIMEOUT):
        with rpc_errors(SERVICE):
            return method(request, metadata=self.metadata, timeout=timeout)

    def get_model(self, name: str) -> RegisteredModel:
        """A registered model with its aliases and latest version."""
        return convert.model_from_pb(self._call(self.stub.GetModel, pb.GetModelRequest(name=name)))

    def list_models(self, *, prefix: str = "", tag: str = "") -> list[RegisteredModel]:
        """Every registered model, all pages; only names starting with `prefix`, only models with `tag` ("key" or
        "key=value") when given."""
        pages = self._pages(self.stub.ListModels, lambda: pb.ListModelsRequest(name_prefix=prefix, tag=tag), "models")
        return [convert.model_from_pb(m) for m in pages]

    def list_versions(self, name: str, *, status: VersionStatus | None = None) -> list[ModelVersion]:
        """The versions of a model, newest first (only those in `status` when given), all pages."""
        fields = {"model_name": name}
        if status is not None:
            fields["status"] = convert.status_to_pb(status)
        pages = self._pages(self.stub.ListVersions, lambda: pb.ListVersionsRequest(**fields), "versions")
        return [convert.version_from_pb(v) for v in pages]

    def get_version(self, name: str, version: int) -> ModelVersion:
        reply = self._call(self.stub.GetVersion, pb.GetVersionRequest(model_name=name, version=version))
        return convert.version_from_pb(reply)

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        """The READY version a reference names: "name" (the latest), "name:3" or "name@alias"."""
        return convert.version_from_pb(self._call(self.stub.Resolve, pb.ResolveRequest(ref=ref_to_pb(ref))))

    def set_alias(self, name: str, alias: str, version: int, *, expected_version: int | None = None) -> Alias:
        """Points an alias at a version; with `expected_version` only if it points there now (0: unset), else
        FailedPrecondition (a compare-and-set for promotions)."""
        request = pb.SetAliasRequest(model_name=name, alias=alias, version=version)
        if expected_version is not None:
            request.expected_version = expected_version
        return convert.alias_from_pb(self._call(self.stub.SetAlias, request))

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(self.stub.DeleteAlias, pb.DeleteAliasRequest(model_name=name, alias=alias))

    def _pages(self, method: Callable, new_request: Callable, field: str) -> Iterator:
        token = ""
        while True:
            request = new_request()
            request.page.page_size, request.page.page_token = PAGE_SIZE, token
            reply = self._call(method, request)
            yield from getattr(reply, field)
            token = reply.page.next_page_token
            if not token:
                return

    def push_file(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        artifact_format: ArtifactFormat = ArtifactFormat.RAW,
        digest: str = "",
        request_id: str = "",
        progress: Progress | None = None,
        timeout: float | None = None,
        description: str = "",
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        lineage: Lineage | None = None,
    ) -> ModelVersion:
        """Uploads a file as a new version of `name` (the model must exist): the bytes go up as a blob, resumably
        (`upload_blob`), then the version is created from it. A request id makes retries idempotent; one is
        generated when none is given. `timeout` bounds each call."""
        with rpc_errors(SERVICE):  # NotFound before any byte moves
            self.stub.GetModel(pb.GetModelRequest(name=name), metadata=self.metadata, timeout=timeout)
        blob = self.upload_blob(path, digest=digest, progress=progress, timeout=timeout)
        meta = pb.VersionMetadata(
            model_name=name,
            artifact_digest=blob.digest,
            artifact_size=blob.size_bytes,
            artifact_format=convert.format_to_pb(artifact_format),
            from_blob=True,
            request_id=request_id or uuid.uuid4().hex,
            description=description,
            metrics=metrics or {},
            params=params or {},
            tags=tags or {},
            lineage=convert.lineage_to_pb(lineage or Lineage()),
        )
        with rpc_errors(SERVICE):
            reply = self.stub.CreateVersion(
                iter([pb.CreateVersionRequest(metadata=meta)]), metadata=self.metadata, timeout=timeout
            )
        return convert.version_from_pb(reply)

    def push_savedmodel(self, name: str, directory: str | os.PathLike, **kwargs) -> ModelVersion:
        """Packs a SavedModel directory as a deterministic tar and uploads it as a new version (push_file's
        keyword arguments apply)."""
        with tempfile.TemporaryDirectory(prefix="modelgrid-push-") as tmp:
            tar_path = Path(tmp) / "model.tar"
            digest = pack_to_file(directory, tar_path)
            return self.push_file(
                name, tar_path, artifact_format=ArtifactFormat.SAVEDMODEL_TAR, digest=digest, **kwargs
            )

    def download(self, ref: str | ModelRef, dest: str | os.PathLike, *, progress: Progress | None = None) -> Download:
        """Downloads a version's artifact into the file `dest`, resuming from what `dest` already holds, and
        checks the digest over the whole file: DataLoss (and `dest` removed) when it does not match."""
        return self._download(
            lambda offset: self.stub.DownloadArtifact(
                pb.DownloadArtifactRequest(ref=ref_to_pb(ref), offset=offset), metadata=self.metadata
            ),
            Path(dest),
            progress,
        )

    def upload_blob(
        self,
        path: str | os.PathLike,
        *,
        digest: str = "",
        progress: Progress | None = None,
        timeout: float | None = None,
        resume_seconds: float = RESUME_SECONDS,
    ) -> Blob:
        """Stores a file by its digest and returns the digest and size. Resumable: the registry says how much of
        the blob it holds already (an earlier upload cut short) and only the rest is sent. Once the registry has
        answered, a connection lost on the way (UNAVAILABLE, or ABORTED while the registry still holds the cut
        upload) is tried again for up to `resume_seconds`, each time from where the registry got to; a registry
        that cannot be reached at all fails at once."""
        size = Path(path).stat().st_size
        digest = digest or file_digest(path)
        reached: list[bool] = []  # non-empty once the registry answered StatUpload
        deadline, delay = 0.0, RESUME_BACKOFF_SECONDS
        while True:
            try:
                return self._upload_rest(path, digest, size, progress, timeout, reached)
            except (Unavailable, Aborted):
                if not reached:
                    raise
                deadline = deadline or time.monotonic() + resume_seconds
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _upload_rest(
        self,
        path: str | os.PathLike,
        digest: str,
        size: int,
        progress: Progress | None,
        timeout: float | None,
        reached: list[bool],
    ) -> Blob:
        with rpc_errors(SERVICE):
            status = self.stub.StatUpload(pb.StatUploadRequest(digest=digest), metadata=self.metadata, timeout=timeout)
        reached.append(True)
        offset = size if status.stored else status.received_bytes if status.received_bytes <= size else 0
        if progress:
            progress(offset, size)  # where it starts: all done when stored, or what an upload cut short left
        if status.stored:
            return Blob(digest, status.received_bytes)

        def messages() -> Iterator[pb.UploadBlobRequest]:
            yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=size, offset=offset))
            done = offset
            for chunk in read_chunks(path, self._chunk_bytes, offset):
                yield pb.UploadBlobRequest(chunk=chunk)
                done += len(chunk)
                if progress:
                    progress(done, size)

        with rpc_errors(SERVICE):
            return convert.blob_from_pb(self.stub.UploadBlob(messages(), metadata=self.metadata, timeout=timeout))

    def download_blob(self, digest: str, dest: str | os.PathLike, *, progress: Progress | None = None) -> Download:
        """Downloads a blob by digest into `dest` (resuming), verified like `download`."""
        return self._download(
            lambda offset: self.stub.DownloadBlob(
                pb.DownloadBlobRequest(digest=digest, offset=offset), metadata=self.metadata
            ),
            Path(dest),
            progress,
        )

    def _download(
        self, open_stream: Callable[[int], Iterator[pb.DownloadArtifactResponse]], dest: Path, progress: Progress | None
    ) -> Download:
        offset = dest.stat().st_size if dest.exists() else 0
        header = None
        with rpc_errors(SERVICE), dest.open("ab") as out:
            for message in open_stream(offset):
                if message.WhichOneof("payload") == "header":
                    header = message.header
                    continue
                out.write(message.chunk)
                offset += len(message.chunk)
                if progress and header is not None:
                    progress(offset, header.artifact.size_bytes)
        if header is None:
            raise DataLoss("the registry sent no header")
        if file_digest(dest) != header.artifact.digest:
            dest.unlink()
            raise DataLoss(f"{dest} does not hash to {header.artifact.digest}; removed it")
        return Download(header.model_name, header.version, convert.artifact_from_pb(header.artifact), header.offset)

    def pull(self, ref: str | ModelRef, directory: str | os.PathLike, *, progress: Progress | None = None) -> Download:
        """Downloads a version and unpacks it into `directory` (a SavedModel tar) or writes it there as
        `artifact` (raw bytes)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="modelgrid-pull-", dir=directory.parent) as tmp:
            blob = Path(tmp) / "artifact"
            downloaded = self.download(ref, blob, progress=progress)
            if downloaded.artifact.format == ArtifactFormat.SAVEDMODEL_TAR:
                unpack(blob, directory)
            else:
                os.replace(blob, directory / "artifact")
        return downloaded
