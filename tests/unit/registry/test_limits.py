"""Names matched in full and metadata bounded: a registry (in this process, over a real channel) refuses a trailing
newline in a name or alias, and descriptions, tags and metrics past its limits, with INVALID_ARGUMENT naming the
limit, and keeps what it held."""

import asyncio
import math

import grpc
import pytest
import pytest_asyncio

from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.registry.main import start_registry

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def stub(registry_settings):
    settings = registry_settings.model_copy(update={"max_description_chars": 100, "max_entries": 4})
    service = await start_registry(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)
    await service.stop()


async def refused(call, request) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details()


async def test_names_and_aliases_are_matched_in_full(stub, unique):
    assert "invalid model name" in await refused(stub.CreateModel, pb.CreateModelRequest(name="abc\n"))
    name = unique()
    await stub.CreateModel(pb.CreateModelRequest(name=name), timeout=10)
    details = await refused(stub.SetAlias, pb.SetAliasRequest(model_name=name, alias="prod\n", version=1))
    assert "invalid alias" in details
    long = await refused(stub.CreateModel, pb.CreateModelRequest(name="n" * 100_000))
    assert len(long) < 300, "the error echoes the whole name"


async def test_descriptions_tags_and_metrics_are_bounded(stub, unique):
    details = await refused(stub.CreateModel, pb.CreateModelRequest(name=unique(), description="d" * 101))
    assert "MODELGRID_REGISTRY_MAX_DESCRIPTION_CHARS" in details
    tags = {f"k{i}": "v" for i in range(5)}
    assert "MAX_ENTRIES" in await refused(stub.CreateModel, pb.CreateModelRequest(name=unique(), tags=tags))
    details = await refused(stub.CreateModel, pb.CreateModelRequest(name=unique(), tags={"bad\nkey": "v"}))
    assert "printable" in details

    name = unique()
    await stub.CreateModel(pb.CreateModelRequest(name=name, tags={"a": "1", "b": "2", "c": "3"}), timeout=10)
    # One more fits, two more do not: the whole set counts, and a refused change changes nothing.
    assert "MAX_ENTRIES" in await refused(
        stub.UpdateModel, pb.UpdateModelRequest(name=name, set_tags={"d": "", "e": ""})
    )
    assert dict((await stub.GetModel(pb.GetModelRequest(name=name), timeout=10)).tags) == {"a": "1", "b": "2", "c": "3"}
    await stub.UpdateModel(pb.UpdateModelRequest(name=name, set_tags={"d": "4"}), timeout=10)

    meta = pb.VersionMetadata(model_name=name, artifact_digest="ab" * 32, metrics={"loss": math.nan})
    details = await refused(
        lambda r, timeout: stub.CreateVersion(iter([r]), timeout=timeout), pb.CreateVersionRequest(metadata=meta)
    )
    assert "finite" in details


async def test_watch_streams_are_bounded_and_leave_redis_for_other_calls(registry_settings, unique):
    """Each WatchEvents stream holds a Redis connection in a blocking read: past max_watch_streams a stream is
    refused at once, and the other calls still find a connection in a pool barely larger."""
    settings = registry_settings.model_copy(update={"redis_max_connections": 6, "max_watch_streams": 4})
    service = await start_registry(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            name = unique()
            await stub.CreateModel(pb.CreateModelRequest(name=name), timeout=10)
            watches = [stub.WatchEvents(pb.WatchEventsRequest(cursor="0", model_name=name)) for _ in range(4)]
            for watch in watches:
                assert (await watch.read()).model_name == name  # open, and reading Redis
            extra = stub.WatchEvents(pb.WatchEventsRequest(cursor="0"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MODELGRID_REGISTRY_MAX_WATCH_STREAMS" in err.value.details()

            replies = await asyncio.gather(
                *(stub.GetModel(pb.GetModelRequest(name=name), timeout=10) for _ in range(30))
            )
            assert {r.name for r in replies} == {name}

            watches[0].cancel()
            await asyncio.sleep(0.2)
            again = stub.WatchEvents(pb.WatchEventsRequest(cursor="0", model_name=name))
            assert (await again.read()).model_name == name  # a closed stream frees its place
            for watch in [*watches[1:], again]:
                watch.cancel()
    finally:
        await service.stop()
