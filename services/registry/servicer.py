"""Thin gRPC servicer of modelgrid.registry.v1.ModelRegistry: protobuf in, core call, protobuf out."""

import asyncio
from collections.abc import AsyncIterator, Iterator

from modelgrid.client.convert import ref_from_pb
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.registry import convert as api
from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.kit.watch_limits import WatchLimits, client_id
from services.registry.converters import new_version_from_pb
from services.registry.core import ModelRegistry


def _page(token: str) -> common_pb2.PageResponse:
    return common_pb2.PageResponse(next_page_token=token)


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    """Adapts gRPC calls to ModelRegistry."""

    def __init__(self, registry: ModelRegistry, watches: WatchLimits) -> None:
        self._registry = registry
        self._watches = watches

    async def CreateModel(self, request: pb.CreateModelRequest, context) -> pb.RegisteredModel:
        model = await self._registry.create_model(
            request.name, request.description, dict(request.tags), client_id(context)
        )
        return api.model_to_pb(model)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.RegisteredModel:
        return api.model_to_pb(await self._registry.get_model(request.name))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        page = await self._registry.list_models(
            request.name_prefix, request.tag, request.page.page_size, request.page.page_token
        )
        return pb.ListModelsResponse(models=[api.model_to_pb(m) for m in page.items], page=_page(page.next_token))

    async def UpdateModel(self, request: pb.UpdateModelRequest, context) -> pb.RegisteredModel:
        description = request.description if request.HasField("description") else None
        model = await self._registry.update_model(
            request.name, description, dict(request.set_tags), list(request.remove_tags), client_id(context)
        )
        return api.model_to_pb(model)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        count = await self._registry.delete_model(request.name, request.force, client_id(context))
        return pb.DeleteModelResponse(deleted_versions=count)

    async def CreateVersion(self, request_iterator: AsyncIterator[pb.CreateVersionRequest], context) -> pb.ModelVersion:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise InvalidArgument("the first CreateVersion message must carry metadata")

        meta = new_version_from_pb(first.metadata)
        chunks = _chunks_of(request_iterator, "CreateVersion")
        version = await self._registry.create_version(meta, chunks, client_id(context))
        return api.version_to_pb(version)

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.ModelVersion:
        return api.version_to_pb(await self._registry.get_version(request.model_name, request.version))

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        page = await self._registry.list_versions(
            request.model_name, api.status_from_pb(request.status), request.page.page_size, request.page.page_token
        )
        return pb.ListVersionsResponse(versions=[api.version_to_pb(v) for v in page.items], page=_page(page.next_token))

    async def UpdateVersion(self, request: pb.UpdateVersionRequest, context) -> pb.ModelVersion:
        version = await self._registry.update_version(
            request.model_name,
            request.version,
            request.description if request.HasField("description") else None,
            dict(request.set_metrics),
            dict(request.set_tags),
            list(request.remove_tags),
            api.status_from_pb(request.status),
            client_id(context),
        )
        return api.version_to_pb(version)

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest, context):
        version, chunks = await self._registry.open_artifact(ref_from_pb(request.ref), request.offset)
        yield pb.DownloadArtifactResponse(
            header=pb.ArtifactHeader(
                model_name=version.model_name,
                version=version.version,
                artifact=api.artifact_to_pb(version.artifact),
                offset=request.offset,
            )
        )
        async for message in _chunk_messages(chunks):
            yield message

    async def SetAlias(self, request: pb.SetAliasRequest, context) -> pb.Alias:
        expected = request.expected_version if request.HasField("expected_version") else None
        alias = await self._registry.set_alias(
            request.model_name, request.alias, request.version, expected, client_id(context)
        )
        return api.alias_to_pb(alias)

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context) -> pb.DeleteAliasResponse:
        previous = await self._registry.delete_alias(request.model_name, request.alias, client_id(context))
        return pb.DeleteAliasResponse(previous_version=previous)

    async def Resolve(self, request: pb.ResolveRequest, context) -> pb.ModelVersion:
        return api.version_to_pb(await self._registry.resolve(ref_from_pb(request.ref)))

    async def WatchEvents(self, request: pb.WatchEventsRequest, context):
        with self._watches.hold(context):
            async for event in self._registry.watch(request.cursor, request.model_name):
                yield api.event_to_pb(event)

    async def GetHistory(self, request: pb.GetHistoryRequest, context) -> pb.GetHistoryResponse:
        page = await self._registry.history(
            request.model_name, request.alias, request.version, request.page.page_size, request.page.page_token
        )
        return pb.GetHistoryResponse(events=[api.event_to_pb(e) for e in page.items], page=_page(page.next_token))

    async def UploadBlob(self, request_iterator: AsyncIterator[pb.UploadBlobRequest], context) -> pb.BlobInfo:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise InvalidArgument("the first UploadBlob message must carry metadata")
        meta = first.metadata
        digest, size = await self._registry.upload_blob(
            meta.digest, meta.size_bytes, _chunks_of(request_iterator, "UploadBlob"), meta.offset
        )
        return pb.BlobInfo(digest=digest, size_bytes=size)

    async def StatUpload(self, request: pb.StatUploadRequest, context) -> pb.UploadStatus:
        stored, received = await self._registry.stat_upload(request.digest)
        return pb.UploadStatus(digest=request.digest, stored=stored, received_bytes=received)

    async def StatBlob(self, request: pb.StatBlobRequest, context) -> pb.BlobInfo:
        size = await self._registry.stat_blob(request.digest)
        return pb.BlobInfo(digest=request.digest, size_bytes=size)

    async def DownloadBlob(self, request: pb.DownloadBlobRequest, context):
        size, chunks = await self._registry.open_blob(request.digest, request.offset)
        artifact = pb.Artifact(digest=request.digest, size_bytes=size, format=pb.ARTIFACT_FORMAT_RAW)
        yield pb.DownloadArtifactResponse(header=pb.ArtifactHeader(artifact=artifact, offset=request.offset))
        async for message in _chunk_messages(chunks):
            yield message


async def _chunks_of(request_iterator: AsyncIterator, rpc: str) -> AsyncIterator[bytes]:
    """The chunk payloads of an upload stream after its first (metadata) message."""
    async for message in request_iterator:
        if message.WhichOneof("payload") != "chunk":
            raise InvalidArgument(f"only the first {rpc} message may carry metadata")
        yield message.chunk


async def _chunk_messages(chunks: Iterator[bytes]) -> AsyncIterator[pb.DownloadArtifactResponse]:
    """Download messages for blocking file chunks, read off the event loop."""
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield pb.DownloadArtifactResponse(chunk=chunk)
