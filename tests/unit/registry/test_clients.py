"""The typed registry client against a real registry in this process: dataclasses back, kit errors on failure,
verified transfers, the event stream; and the kit's InstancePool finding the registry through real Consul."""

import asyncio
import uuid

import grpc
import pytest

from modelgrid.client.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from modelgrid.client.registry import (
    AsyncRegistryClient,
    EventType,
    Lineage,
    ModelVersion,
    VersionStatus,
)
from modelgrid.registry.v1 import registry_pb2, registry_pb2_grpc
from services.kit.channels import InstancePool, fewest_in_flight
from services.kit.consul import ConsulClient
from services.registry.main import start_registry

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, build_saved_model):
    return build_saved_model(tmp_path_factory.mktemp("model") / "saved", seed=3)


async def _push(client: AsyncRegistryClient, name: str, saved_model, **kwargs) -> ModelVersion:
    await client.ensure_model(name)
    return await client.push_savedmodel(name, saved_model, request_id=uuid.uuid4().hex, **kwargs)


async def test_push_resolve_and_aliases_return_dataclasses(registry_client, saved_model, unique):
    name = unique()
    version = await _push(
        registry_client,
        name,
        saved_model,
        metrics={"accuracy": 0.9},
        lineage=Lineage(training_job_id="job-1", dataset_digest="d" * 64),
    )
    assert (version.model_name, version.version, version.status) == (name, 1, VersionStatus.READY)
    assert version.lineage.training_job_id == "job-1"
    assert version.metrics == {"accuracy": pytest.approx(0.9)}
    (signature,) = version.signatures
    assert [(t.dtype, t.shape) for t in signature.inputs] == [("float32", [-1, 4])]

    await registry_client.ensure_model(name)  # exists already: no error
    alias = await registry_client.set_alias(name, "production", 1, expected_version=0)
    assert (alias.alias, alias.version, alias.previous_version) == ("production", 1, 0)
    with pytest.raises(FailedPrecondition):
        await registry_client.set_alias(name, "production", 1, expected_version=0)  # lost the compare-and-set
    assert (await registry_client.resolve(f"{name}@production")).version == 1
    assert (await registry_client.get_model(name)).aliases == {"production": 1}
    assert [v.version for v in await registry_client.list_versions(name)] == [1]
    assert name in await registry_client.list_model_names()


async def test_failures_are_kit_errors(registry_client, unique):
    with pytest.raises(NotFound):
        await registry_client.get_model(unique())
    with pytest.raises(NotFound):
        await registry_client.resolve(f"{unique()}:3")
    with pytest.raises(NotFound):
        await registry_client.stat_blob("0" * 64)


async def test_blobs_and_versions_download_verified(registry_client, saved_model, unique, tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"rows" * 50_000)
    blob = await registry_client.upload_blob(data)
    assert (await registry_client.stat_blob(blob.digest)) == blob
    downloaded = await registry_client.download_blob(blob.digest, tmp_path / "copy.bin")
    assert downloaded.artifact.digest == blob.digest
    assert (tmp_path / "copy.bin").read_bytes() == data.read_bytes()

    name = unique()
    version = await _push(registry_client, name, saved_model)
    got = await registry_client.download_version(name, version.version, tmp_path / "model.tar")
    assert (got.model_name, got.version, got.artifact) == (name, 1, version.artifact)


async def test_a_version_is_created_from_an_uploaded_blob_idempotently(
    registry, registry_client, saved_model, unique, tmp_path
):
    """What the trainer does with the SavedModel its chief's agent uploaded: no artifact bytes move again."""
    name = unique()
    await registry_client.ensure_model(name)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    blob = await registry_client.upload_directory(saved_model, scratch_dir=scratch, max_bytes=1 << 30)
    assert not list(scratch.iterdir()), "the staged tar was left behind"
    pushed = await _push(registry_client, unique(), saved_model)
    assert blob.digest == pushed.artifact.digest, "the blob is not the SavedModel tar a push makes"

    version = await registry_client.create_version_from_blob(
        name, blob.digest, request_id="job-1", metrics={"accuracy": 0.5}, lineage=Lineage(training_job_id="job-1")
    )
    again = await registry_client.create_version_from_blob(name, blob.digest, request_id="job-1")

    assert version.version == again.version == 1 and version.artifact == pushed.artifact
    assert version.signatures == pushed.signatures and version.metrics == {"accuracy": pytest.approx(0.5)}
    assert version.lineage.training_job_id == "job-1"
    assert [v.version for v in await registry_client.list_versions(name)] == [1]
    got = await registry_client.download_version(name, 1, tmp_path / "model.tar")
    assert got.artifact.digest == blob.digest
    with pytest.raises(NotFound):
        await registry_client.create_version_from_blob(name, "0" * 64, request_id="job-2")
    with pytest.raises(ResourceExhausted):
        await registry_client.upload_directory(saved_model, max_bytes=1000)
    not_a_model = tmp_path / "rows.bin"
    not_a_model.write_bytes(b"rows" * 1000)
    raw = await registry_client.upload_blob(not_a_model)
    with pytest.raises(InvalidArgument, match="not a readable tar"):
        await registry_client.create_version_from_blob(name, raw.digest, request_id="job-3")

    meta = registry_pb2.VersionMetadata(model_name=name, artifact_digest=blob.digest, from_blob=True)
    messages = [registry_pb2.CreateVersionRequest(metadata=meta), registry_pb2.CreateVersionRequest(chunk=b"x")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry_pb2_grpc.ModelRegistryStub(channel).CreateVersion(iter(messages), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes no artifact bytes" in err.value.details()
    assert (await registry_client.get_model(name)).latest_version == 1


async def test_watch_starts_at_once_and_yields_typed_events(registry_client, saved_model, unique):
    name = unique()
    events = registry_client.watch("", model_name=name)
    await asyncio.sleep(0.2)  # the call is open before anything happens
    await _push(registry_client, name, saved_model)
    seen = []
    async with asyncio.timeout(10):
        async for event in events:
            seen.append(event.type)
            if event.type == EventType.VERSION_CREATED:
                break
    assert seen == [EventType.MODEL_CREATED, EventType.VERSION_CREATED]
    await events.aclose()


async def test_a_registry_that_is_gone_is_unavailable(registry_settings):
    pool = InstancePool(None, "registry", targets=["127.0.0.1:1"])
    await pool.start()
    try:
        with pytest.raises(Unavailable):
            await AsyncRegistryClient(pool).get_model("any")
    finally:
        await pool.close()


async def test_pool_follows_the_healthy_set_in_consul(consul, registry_settings):
    settings = registry_settings.model_copy(
        update={"consul_enabled": True, "consul_url": consul.http_url, "consul_check_interval": "1s"}
    )
    registry = await start_registry(settings)
    consul_client = ConsulClient(consul.http_url)
    pool = InstancePool(consul_client, "registry", picker=fewest_in_flight(), close_grace=0.1)
    changes = []
    pool.add_listener(lambda: changes.append(set(pool.members)))
    await pool.start()
    try:
        await pool.wait_for(lambda members: registry.instance_id in members, timeout=20)
        member = pool.members[registry.instance_id]
        assert member.target == f"{settings.advertise_host}:{registry.port}"
        client = AsyncRegistryClient(lambda: pool.channel_for(registry.instance_id))
        with pytest.raises(NotFound):
            await client.get_model("no-such-model")

        with member.track():
            assert member.in_flight == 1
        assert member.in_flight == 0
        pool.eject(member, 60)
        others = [m for m in pool.members.values() if m is not member]
        assert pool.pick() in (others or [member])  # ejected members are picked only when nothing else is left

        await registry.stop()  # deregisters: the pool drops it, but can still reach it by id (it was seen)
        await pool.wait_for(lambda members: registry.instance_id not in members, timeout=20)
        assert changes and registry.instance_id not in changes[-1]
        assert pool.channel_for(registry.instance_id) is not None
        with pytest.raises(Unavailable):
            pool.channel_for("never-seen")
    finally:
        await pool.close()
        await consul_client.close()
        await registry.stop()


async def test_pool_needs_consul_or_fixed_targets():
    with pytest.raises(ValueError):
        InstancePool(None, "registry")
