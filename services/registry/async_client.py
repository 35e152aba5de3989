"""asyncio client of the registry for services (predictor, trainer): resolve, download and upload with digests
checked, and follow the event stream. Channels come from a callable, so a Consul-backed ChannelPool spreads calls
over healthy registry instances."""

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.kit.artifacts import CHUNK_BYTES, file_digest, pack_to_file, read_chunks
from services.kit.errors import DataLoss
from services.kit.modelref import ModelRef
from services.registry.client import ref_message

ChannelSource = Callable[[], grpc.aio.Channel]


class AsyncRegistryClient:
    """Registry calls for services; `channel()` is asked for a channel on every call."""

    def __init__(self, channel: ChannelSource, *, client_id: str = "") -> None:
        self._channel = channel
        self._metadata = (("x-modelgrid-client", client_id),) if client_id else ()

    def _stub(self) -> registry_pb2_grpc.ModelRegistryStub:
        return registry_pb2_grpc.ModelRegistryStub(self._channel())

    async def resolve(self, ref: ModelRef | str, timeout: float = 10.0) -> pb.ModelVersion:
        """The READY version a reference names."""
        request = pb.ResolveRequest(ref=ref_message(ref))
        return await self._stub().Resolve(request, metadata=self._metadata, timeout=timeout)

    async def get_model(self, name: str, timeout: float = 10.0) -> pb.RegisteredModel:
        """A registered model with its aliases."""
        return await self._stub().GetModel(pb.GetModelRequest(name=name), metadata=self._metadata, timeout=timeout)

    async def list_model_names(self, timeout: float = 10.0) -> list[str]:
        """Names of every registered model."""
        names, token = [], ""
        while True:
            request = pb.ListModelsRequest()
            request.page.page_size, request.page.page_token = 1000, token
            reply = await self._stub().ListModels(request, metadata=self._metadata, timeout=timeout)
            names += [m.name for m in reply.models]
            token = reply.page.next_page_token
            if not token:
                return names

    async def list_versions(self, name: str, timeout: float = 10.0) -> list[pb.ModelVersion]:
        """Every READY version of a model, newest first."""
        versions, token = [], ""
        while True:
            request = pb.ListVersionsRequest(model_name=name, status=pb.VERSION_STATUS_READY)
            request.page.page_size, request.page.page_token = 1000, token
            reply = await self._stub().ListVersions(request, metadata=self._metadata, timeout=timeout)
            versions += reply.versions
            token = reply.page.next_page_token
            if not token:
                return versions

    async def download_version(self, name: str, version: int, dest: Path) -> pb.ArtifactHeader:
        """Downloads one version's artifact into `dest`, verified against its digest."""
        request = pb.DownloadArtifactRequest(ref=ref_message(ModelRef(name, version=version)))
        return await _receive(self._stub().DownloadArtifact(request, metadata=self._metadata), dest)

    async def download_blob(self, digest: str, dest: Path) -> pb.ArtifactHeader:
        """Downloads a blob into `dest`, verified against its digest."""
        request = pb.DownloadBlobRequest(digest=digest)
        return await _receive(self._stub().DownloadBlob(request, metadata=self._metadata), dest)

    async def stat_blob(self, digest: str, timeout: float = 10.0) -> pb.BlobInfo:
        """Size of a stored blob; the call fails with NOT_FOUND when it is absent."""
        return await self._stub().StatBlob(pb.StatBlobRequest(digest=digest), metadata=self._metadata, timeout=timeout)

    async def upload_blob(self, path: str | os.PathLike) -> pb.BlobInfo:
        """Stores a file by digest (e.g. batch prediction results)."""
        digest = await asyncio.to_thread(file_digest, path)
        size = Path(path).stat().st_size

        async def messages() -> AsyncIterator[pb.UploadBlobRequest]:
            yield pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=digest, size_bytes=size))
            chunks = read_chunks(path, CHUNK_BYTES)
            done = object()
            while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
                yield pb.UploadBlobRequest(chunk=chunk)

        return await self._stub().UploadBlob(messages(), metadata=self._metadata)

    async def ensure_model(self, name: str, description: str = "") -> None:
        """Creates the model unless it exists."""
        try:
            await self._stub().CreateModel(
                pb.CreateModelRequest(name=name, description=description), metadata=self._metadata, timeout=10
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    async def push_savedmodel(
        self, name: str, directory: str | os.PathLike, *, request_id: str, **metadata
    ) -> pb.ModelVersion:
        """Packs a SavedModel directory (deterministic tar) and uploads it as a new version; `request_id` makes
        a retry (e.g. by a restarted trainer) return the version created the first time."""
        with tempfile.TemporaryDirectory(prefix="modelgrid-push-") as tmp:
            tar_path = Path(tmp) / "model.tar"
            digest = await asyncio.to_thread(pack_to_file, directory, tar_path)
            meta = pb.VersionMetadata(
                model_name=name, artifact_digest=digest, artifact_size=tar_path.stat().st_size,
                artifact_format=pb.ARTIFACT_FORMAT_SAVEDMODEL_TAR, request_id=request_id, **metadata,
            )  # fmt: skip

            async def messages() -> AsyncIterator[pb.CreateVersionRequest]:
                yield pb.CreateVersionRequest(metadata=meta)
                chunks = read_chunks(tar_path, CHUNK_BYTES)
                done = object()
                while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
                    yield pb.CreateVersionRequest(chunk=chunk)

            return await self._stub().CreateVersion(messages(), metadata=self._metadata)

    async def set_alias(self, name: str, alias: str, version: int) -> pb.Alias:
        """Points an alias at a version (unconditionally)."""
        request = pb.SetAliasRequest(model_name=name, alias=alias, version=version)
        return await self._stub().SetAlias(request, metadata=self._metadata, timeout=10)

    async def watch(self, cursor: str, model_name: str = "") -> AsyncIterator[pb.RegistryEvent]:
        """Registry events after `cursor` ("" from now), as they happen. Ends when the stream breaks; the caller
        reconnects with the last cursor it processed."""
        request = pb.WatchEventsRequest(cursor=cursor, model_name=model_name)
        async for event in self._stub().WatchEvents(request, metadata=self._metadata):
            yield event


async def _receive(stream, dest: Path) -> pb.ArtifactHeader:
    """Writes a DownloadArtifact-style stream into `dest` while hashing; DataLoss on a digest mismatch."""
    header = None
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        async for message in stream:
            if message.WhichOneof("payload") == "header":
                header = message.header
                continue
            digest.update(message.chunk)
            await asyncio.to_thread(out.write, message.chunk)
    if header is None or digest.hexdigest() != header.artifact.digest:
        dest.unlink(missing_ok=True)
        raise DataLoss(f"download into {dest} does not match the registry's digest")
    return header
