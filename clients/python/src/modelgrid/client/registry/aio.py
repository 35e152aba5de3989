"""asyncio client of the registry for services: resolve, download and upload with digests checked, and follow the
event stream. Replies are the registry's dataclasses; failures are the kit's domain errors, never gRPC errors.

Calls go over one grpc.aio channel, or over the channel a source picks per call: a callable returning a channel, or
an object with a `channel()` method (the services pass a pool of the healthy registry instances in Consul).
"""

import asyncio
import functools
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from modelgrid.client.artifacts import CHUNK_BYTES, file_digest, pack_to_file, read_chunks
from modelgrid.client.channels import ChannelSource, channel_picker
from modelgrid.client.convert import ref_to_pb
from modelgrid.client.errors import AlreadyExists, DataLoss, InvalidArgument, ResourceExhausted
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
    RegistryEvent,
)
from modelgrid.client.rpc_errors import rpc_errors
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc

CLIENT_ID_HEADER = "x-modelgrid-client"
SERVICE = "registry"
TIMEOUT = 10.0  # seconds, for every metadata call
FROM_BLOB_TIMEOUT = 60.0  # a version from a blob: the registry reads its signatures from the stored tar


class AsyncRegistryClient:
    """Registry calls for services; a channel is picked for every call."""

    def __init__(self, channels: ChannelSource, *, client_id: str = "") -> None:
        self._channel = channel_picker(channels)
        self._metadata = ((CLIENT_ID_HEADER, client_id),) if client_id else ()

    def _stub(self) -> registry_pb2_grpc.ModelRegistryStub:
        return registry_pb2_grpc.ModelRegistryStub(self._channel())

    async def resolve(self, ref: ModelRef | str) -> ModelVersion:
        """The READY version a reference names."""
        with rpc_errors(SERVICE):
            reply = await self._stub().Resolve(
                pb.ResolveRequest(ref=ref_to_pb(ref)), metadata=self._metadata, timeout=TIMEOUT
            )
        return convert.version_from_pb(reply)

    async def get_model(self, name: str) -> RegisteredModel:
        """A registered model with its aliases."""
        with rpc_errors(SERVICE):
            reply = await self._stub().GetModel(pb.GetModelRequest(name=name), metadata=self._metadata, timeout=TIMEOUT)
        return convert.model_from_pb(reply)

    async def list_models(self) -> list[RegisteredModel]:
        """Every registered model, with its tags and aliases."""
        return [convert.model_from_pb(m) for m in await self._all_pages("ListModels", pb.ListModelsRequest, "models")]

    async def list_model_names(self) -> list[str]:
        """Names of every registered model."""
        return [model.name for model in await self.list_models()]

    async def list_versions(self, name: str) -> list[ModelVersion]:
        """Every READY version of a model, newest first."""
        request = functools.partial(pb.ListVersionsRequest, model_name=name, status=pb.VERSION_STATUS_READY)
        return [convert.version_from_pb(v) for v in await self._all_pages("ListVersions", request, "versions")]

    async def _all_pages(self, method: str, new_request: Callable, field: str) -> list:
        """The `field` items of every page of a list call (1000 a page)."""
        items, token = [], ""
        while True:
            request = new_request()
            request.page.page_size, request.page.page_token = 1000, token
            with rpc_errors(SERVICE):
                reply = await getattr(self._stub(), method)(request, metadata=self._metadata, timeout=TIMEOUT)
            items += getattr(reply, field)
            token = reply.page.next_page_token
            if not token:
                return items

    async def download_version(self, name: str, version: int, dest: Path) -> Download:
        """Downloads one version's artifact into `dest`, resuming from what `dest` holds already (a download cut
        short), verified against its digest over the whole file (DataLoss, and `dest` removed, if not)."""
        ref = ref_to_pb(ModelRef(name, version=version))
        return await _receive(
            lambda offset: self._stub().DownloadArtifact(
                pb.DownloadArtifactRequest(ref=ref, offset=offset), metadata=self._metadata
            ),
            dest,
        )

    async def download_blob(self, digest: str, dest: Path) -> Download:
        """Downloads a blob into `dest`, resuming and verified like `download_version`."""
        return await _receive(
            lambda offset: self._stub().DownloadBlob(
                pb.DownloadBlobRequest(digest=digest, offset=offset), metadata=self._metadata
            ),
            dest,
        )

    async def stat_blob(self, digest: str) -> Blob:
        """A stored blob's size; NotFound when it is absent."""
        with rpc_errors(SERVICE):
            reply = await self._stub().StatBlob(
                pb.StatBlobRequest(digest=digest), metadata=self._metadata, timeout=TIMEOUT
            )
        return convert.blob_from_pb(reply)

    async def upload_blob(self, path: str | os.PathLike) -> Blob:
        """Stores a file by digest (a data set, batch prediction results, a SavedModel). Resumable: only what the
        registry does not hold yet of the blob (an earlier upload cut short) is sent, so a caller that tries again
        after UNAVAILABLE (or ABORTED, while the registry still holds the cut upload) continues where it stopped."""
        digest = await asyncio.to_thread(file_digest, path)
        size = Path(path).stat().st_size
        with rpc_errors(SERVICE):
            status = await self._stub().StatUpload(
                pb.StatUploadRequest(digest=digest), metadata=self._metadata, timeout=TIMEOUT
            )
        if status.stored:
            return Blob(digest, status.received_bytes)
        offset = status.received_bytes if status.received_bytes <= size else 0

        async def messages() -> AsyncIterator[pb.UploadBlobRequest]:
            yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=size, offset=offset))
            async for chunk in _chunks_of(path, offset):
                yield pb.UploadBlobRequest(chunk=chunk)

        with rpc_errors(SERVICE):
            reply = await self._stub().UploadBlob(messages(), metadata=self._metadata)
        return convert.blob_from_pb(reply)

    async def upload_directory(
        self, directory: str | os.PathLike, *, scratch_dir: str | os.PathLike | None = None, max_bytes: int = 0
    ) -> Blob:
        """Packs a directory as a deterministic tar (the format of a SavedModel artifact: the same directory always
        gives the same digest) and stores it as a blob; a version can then be created from it
        (`create_version_from_blob`). The tar is staged in `scratch_dir` (default: the system's temporary
        directory) and removed afterwards. ResourceExhausted, before any byte is sent, when the tar is larger
        than `max_bytes` (0: no limit of the client's)."""
        with tempfile.TemporaryDirectory(prefix="modelgrid-upload-", dir=scratch_dir) as tmp:
            tar_path = Path(tmp) / "directory.tar"
            await asyncio.to_thread(pack_to_file, directory, tar_path)
            size = tar_path.stat().st_size
            if max_bytes and size > max_bytes:
                raise ResourceExhausted(f"{Path(directory).name} packs to {size} bytes, over the limit of {max_bytes}")
            return await self.upload_blob(tar_path)

    async def create_version_from_blob(
        self,
        name: str,
        digest: str,
        *,
        request_id: str,
        artifact_format: ArtifactFormat = ArtifactFormat.SAVEDMODEL_TAR,
        description: str = "",
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        lineage: Lineage | None = None,
    ) -> ModelVersion:
        """A new version whose artifact is a blob uploaded before (`upload_directory` of a SavedModel): no bytes
        move. NotFound when the registry holds no such blob; `request_id` makes a retry return the version created
        the first time."""
        meta = _version_metadata(name, digest, request_id, description, metrics, params, tags, lineage)
        meta.artifact_format, meta.from_blob = convert.format_to_pb(artifact_format), True

        async def messages() -> AsyncIterator[pb.CreateVersionRequest]:
            yield pb.CreateVersionRequest(metadata=meta)

        with rpc_errors(SERVICE):
            reply = await self._stub().CreateVersion(messages(), metadata=self._metadata, timeout=FROM_BLOB_TIMEOUT)
        return convert.version_from_pb(reply)

    async def ensure_model(self, name: str, description: str = "") -> None:
        """Creates the model unless it exists."""
        request = pb.CreateModelRequest(name=name, description=description)
        try:
            with rpc_errors(SERVICE):
                await self._stub().CreateModel(request, metadata=self._metadata, timeout=TIMEOUT)
        except AlreadyExists:
            pass

    async def push_savedmodel(
        self,
        name: str,
        directory: str | os.PathLike,
        *,
        request_id: str,
        description: str = "",
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        lineage: Lineage | None = None,
    ) -> ModelVersion:
        """Packs a SavedModel directory (deterministic tar), uploads it as a blob (resumable) and creates a new
        version from it; `request_id` makes a retry (e.g. by a restarted trainer) return the version created the
        first time."""
        blob = await self.upload_directory(directory)
        return await self.create_version_from_blob(
            name,
            blob.digest,
            request_id=request_id,
            description=description,
            metrics=metrics,
            params=params,
            tags=tags,
            lineage=lineage,
        )

    async def set_alias(self, name: str, alias: str, version: int, *, expected_version: int | None = None) -> Alias:
        """Points an alias at a version; with `expected_version` only if it points there now (0: unset), else
        FailedPrecondition."""
        request = pb.SetAliasRequest(model_name=name, alias=alias, version=version)
        if expected_version is not None:
            request.expected_version = expected_version
        with rpc_errors(SERVICE):
            reply = await self._stub().SetAlias(request, metadata=self._metadata, timeout=TIMEOUT)
        return convert.alias_from_pb(reply)

    def watch(self, cursor: str = "", model_name: str = "") -> AsyncIterator[RegistryEvent]:
        """Registry events after `cursor` ("" from now), as they happen. The call starts at once (events after
        this point are not missed while the caller resyncs); iterating ends with a domain error when the stream
        breaks, and the caller reconnects with the last cursor it processed."""
        call = self._stub().WatchEvents(
            pb.WatchEventsRequest(cursor=cursor, model_name=model_name), metadata=self._metadata
        )

        async def events() -> AsyncIterator[RegistryEvent]:
            try:
                with rpc_errors(SERVICE):
                    async for event in call:
                        yield convert.event_from_pb(event)
            finally:
                call.cancel()

        return events()


async def _chunks_of(path: str | os.PathLike, offset: int = 0) -> AsyncIterator[bytes]:
    """A file's bytes from `offset` in chunks, read in a thread."""
    chunks = read_chunks(path, CHUNK_BYTES, offset)
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield chunk


def _version_metadata(
    name: str,
    digest: str,
    request_id: str,
    description: str,
    metrics: dict[str, float] | None,
    params: dict[str, str] | None,
    tags: dict[str, str] | None,
    lineage: Lineage | None,
) -> pb.VersionMetadata:
    """The metadata every new version carries, whether its bytes follow or are a blob already stored."""
    return pb.VersionMetadata(
        model_name=name,
        artifact_digest=digest,
        request_id=request_id,
        description=description,
        metrics=metrics or {},
        params=params or {},
        tags=tags or {},
        lineage=convert.lineage_to_pb(lineage or Lineage()),
    )


async def _receive(open_stream: Callable[[int], grpc.aio.UnaryStreamCall], dest: Path) -> Download:
    """Writes a DownloadArtifact-style stream opened at an offset into `dest`, from the end of what `dest` holds
    (a download cut short keeps its bytes for the next try), hashing the whole file; DataLoss, and `dest` removed,
    when it does not match the digest."""
    digest = hashlib.sha256()
    offset = await asyncio.to_thread(_hash_into, digest, dest)
    header = None
    try:
        with rpc_errors(SERVICE), dest.open("ab") as out:
            async for message in open_stream(offset):
                if message.WhichOneof("payload") == "header":
                    header = message.header
                    continue
                digest.update(message.chunk)
                await asyncio.to_thread(out.write, message.chunk)
    except InvalidArgument:
        if not offset:
            raise
        dest.unlink(missing_ok=True)  # `dest` holds more than the artifact has: not a prefix of it
        return await _receive(open_stream, dest)
    if header is None or digest.hexdigest() != header.artifact.digest:
        dest.unlink(missing_ok=True)
        raise DataLoss(f"download into {dest} does not match the registry's digest")
    return Download(header.model_name, header.version, convert.artifact_from_pb(header.artifact), header.offset)


def _hash_into(digest: "hashlib._Hash", path: Path) -> int:
    """Feeds what `path` holds (nothing if it does not exist) into `digest`; returns its size."""
    size = 0
    try:
        for chunk in read_chunks(path, CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    except FileNotFoundError:
        pass
    return size
