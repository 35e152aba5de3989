"""The registry end to end over real gRPC, with a real Consul agent and a real Redis server."""

import concurrent.futures
import hashlib
import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from modelgrid.client.artifacts import pack_to_file
from modelgrid.client.convert import ref_to_pb
from modelgrid.client.errors import InvalidArgument, ResourceExhausted
from modelgrid.client.registry import ArtifactFormat, VersionStatus
from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb

MiB = 1024 * 1024
MAX_ARTIFACT = 4 * MiB
REGISTRY_SETTINGS = {"MAX_ARTIFACT_BYTES": str(MAX_ARTIFACT)}  # for the `registry` fixture (integration/conftest.py)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def client(registry, client_for):
    channel, registry_client = client_for(registry)
    yield registry_client
    channel.close()


@pytest.fixture()
def model(client, unique) -> str:
    name = unique()
    client.ensure_model(name)
    return name


def push_bytes(client, name: str, data: bytes, tmp_path: Path, **kwargs) -> pb.ModelVersion:
    path = tmp_path / f"blob-{sha256_hex(data)[:8]}"
    path.write_bytes(data)
    return client.push_file(name, path, **kwargs)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


# -- Consul --------------------------------------------------------------------------------------------------


def test_registers_in_consul_then_deregisters_on_sigterm(consul, redis_server, tmp_path, launch):
    process = launch.registry(consul.http_url, redis_server.url, tmp_path)

    headers = {"X-Consul-Token": consul.master_token}  # Consul's ACLs deny an anonymous read

    def passing_ports() -> set[int]:
        reply = httpx.get(f"{consul.http_url}/v1/health/service/registry", params={"passing": "true"}, headers=headers)
        return {entry["Service"]["Port"] for entry in reply.json()}

    def catalog_ports() -> set[int]:
        return {
            s["ServicePort"]
            for s in httpx.get(f"{consul.http_url}/v1/catalog/service/registry", headers=headers).json()
        }

    try:
        deadline = time.monotonic() + 20
        while process.port not in passing_ports():
            assert time.monotonic() < deadline, "registry never turned passing in Consul"
            time.sleep(0.2)
        assert process.terminate() == 0
        assert process.port not in catalog_ports()
    finally:
        process.kill()


# -- artifacts -----------------------------------------------------------------------------------------------


def test_push_and_pull_savedmodel_round_trip_with_signature(client, model, tmp_path, build_saved_model):
    import tensorflow as tf

    source = build_saved_model(tmp_path / "saved")
    expected_digest = pack_to_file(source, tmp_path / "expected.tar")

    version = client.push_savedmodel(model, source, metrics={"accuracy": 0.9}, params={"lr": "0.01"})
    assert version.version == 1
    assert version.status == VersionStatus.READY
    assert version.artifact.digest == expected_digest
    assert version.artifact.format == ArtifactFormat.SAVEDMODEL_TAR
    assert version.created_by == "pytest"

    (signature,) = version.signatures
    loaded = tf.saved_model.load(str(source)).signatures["serving_default"]
    assert signature.name == "serving_default"
    assert [(t.name, t.dtype, list(t.shape)) for t in signature.inputs] == [
        (name, "float32", [-1, 4]) for name in loaded.structured_input_signature[1]
    ]
    assert [(t.name, list(t.shape)) for t in signature.outputs] == [
        (name, [-1 if d is None else d for d in spec.shape]) for name, spec in loaded.structured_outputs.items()
    ]

    header = client.pull(f"{model}:1", tmp_path / "pulled")
    assert header.artifact.digest == expected_digest
    source_files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    pulled_files = sorted(p.relative_to(tmp_path / "pulled") for p in (tmp_path / "pulled").rglob("*") if p.is_file())
    assert pulled_files == source_files
    for rel in source_files:
        assert (tmp_path / "pulled" / rel).read_bytes() == (source / rel).read_bytes()
    assert pack_to_file(tmp_path / "pulled", tmp_path / "again.tar") == expected_digest


def test_download_resumes_from_an_offset(client, model, tmp_path):
    data = os.urandom(3 * MiB + 123)
    push_bytes(client, model, data, tmp_path)
    partial = tmp_path / "partial"
    partial.write_bytes(data[: MiB + 7])
    header = client.download(model, partial)
    assert header.offset == MiB + 7
    assert partial.read_bytes() == data


def test_identical_bytes_are_stored_once(client, registry, model, tmp_path):
    data = os.urandom(100_000)
    first = push_bytes(client, model, data, tmp_path)
    second = push_bytes(client, model, data, tmp_path)
    assert (first.version, second.version) == (1, 2)
    assert first.artifact.digest == second.artifact.digest
    blob_root = Path(registry.env["MODELGRID_REGISTRY_BLOB_DIR"]) / "sha256"
    assert len(list(blob_root.rglob(first.artifact.digest))) == 1


# -- concurrency and idempotency -----------------------------------------------------------------------------


def test_concurrent_uploads_get_versions_1_to_20(client, model, tmp_path):
    payloads = [os.urandom(50_000) for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        versions = list(pool.map(lambda d: push_bytes(client, model, d, tmp_path).version, payloads))
    assert sorted(versions) == list(range(1, 21))
    listed = client.stub.ListVersions(
        pb.ListVersionsRequest(model_name=model, page=common_pb2.PageRequest(page_size=100))
    )
    assert [v.version for v in listed.versions] == list(range(20, 0, -1))


def test_retry_with_the_same_request_id_creates_one_version(client, model, tmp_path):
    data = os.urandom(10_000)
    first = push_bytes(client, model, data, tmp_path, request_id="job-42-export")
    retried = push_bytes(client, model, data, tmp_path, request_id="job-42-export")
    assert retried.version == first.version == 1
    assert client.stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 1


def test_racing_set_alias_one_wins_one_loses(client, model, tmp_path):
    for _ in range(2):
        push_bytes(client, model, os.urandom(1000), tmp_path)
    barrier = threading.Barrier(2)

    def claim(version: int) -> grpc.StatusCode:
        barrier.wait()
        request = pb.SetAliasRequest(model_name=model, alias="production", version=version, expected_version=0)
        try:
            client.stub.SetAlias(request)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(claim, [1, 2]))
    assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION], key=str)
    winner = [1, 2][codes.index(grpc.StatusCode.OK)]
    assert client.stub.Resolve(pb.ResolveRequest(ref=ref_to_pb(f"{model}@production"))).version == winner


# -- aliases, resolve, archive, history ----------------------------------------------------------------------


def test_alias_history_answers_which_version_was_production_when(client, model, tmp_path):
    for _ in range(3):
        push_bytes(client, model, os.urandom(1000), tmp_path)
    for version in (1, 3, 2):
        request = pb.SetAliasRequest(model_name=model, alias="production", version=version)
        client.stub.SetAlias(request, metadata=[("x-modelgrid-client", f"release-bot-{version}")])
    client.stub.DeleteAlias(pb.DeleteAliasRequest(model_name=model, alias="production"))
    history = client.stub.GetHistory(pb.GetHistoryRequest(model_name=model, alias="production")).events
    assert [(e.type, e.version, e.previous_version) for e in history] == [
        (pb.EVENT_TYPE_ALIAS_SET, 1, 0),
        (pb.EVENT_TYPE_ALIAS_SET, 3, 1),
        (pb.EVENT_TYPE_ALIAS_SET, 2, 3),
        (pb.EVENT_TYPE_ALIAS_DELETED, 0, 2),
    ]
    times = [e.time.ToNanoseconds() for e in history]
    assert times == sorted(times)
    assert [e.actor for e in history[:3]] == ["release-bot-1", "release-bot-3", "release-bot-2"]
    assert history[3].actor.startswith("ipv4:127.0.0.1:")  # no client id: the peer address is recorded


def test_resolve_and_archive(client, model, tmp_path):
    for _ in range(2):
        push_bytes(client, model, os.urandom(1000), tmp_path)
    resolve = client.stub.Resolve
    assert resolve(pb.ResolveRequest(ref=ref_to_pb(model))).version == 2
    client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="canary", version=2))
    archive = pb.UpdateVersionRequest(model_name=model, version=2, status=pb.VERSION_STATUS_ARCHIVED)
    assert code_of(client.stub.UpdateVersion, archive) == grpc.StatusCode.FAILED_PRECONDITION
    client.stub.DeleteAlias(pb.DeleteAliasRequest(model_name=model, alias="canary"))
    archived = client.stub.UpdateVersion(archive)
    assert archived.status == pb.VERSION_STATUS_ARCHIVED
    assert resolve(pb.ResolveRequest(ref=ref_to_pb(model))).version == 1
    assert code_of(resolve, pb.ResolveRequest(ref=ref_to_pb(f"{model}:2"))) == grpc.StatusCode.FAILED_PRECONDITION
    request = pb.SetAliasRequest(model_name=model, alias="canary", version=2)
    assert code_of(client.stub.SetAlias, request) == grpc.StatusCode.FAILED_PRECONDITION


def test_update_version_metrics_and_tags(client, model, tmp_path):
    push_bytes(client, model, os.urandom(1000), tmp_path, metrics={"loss": 0.5})
    updated = client.stub.UpdateVersion(
        pb.UpdateVersionRequest(model_name=model, version=1, set_metrics={"accuracy": 0.97}, set_tags={"team": "ml"})
    )
    assert dict(updated.metrics) == {"loss": 0.5, "accuracy": 0.97}
    assert dict(updated.tags) == {"team": "ml"}


def test_list_models_by_prefix_and_tag_across_pages(client, unique):
    prefix = unique("list")
    for i in range(5):
        client.stub.CreateModel(pb.CreateModelRequest(name=f"{prefix}-{i}", tags={"team": "a" if i % 2 else "b"}))
    seen, token = [], ""
    while True:
        reply = client.stub.ListModels(
            pb.ListModelsRequest(name_prefix=prefix, page=common_pb2.PageRequest(page_size=2, page_token=token))
        )
        seen += [m.name for m in reply.models]
        token = reply.page.next_page_token
        if not token:
            break
    assert seen == [f"{prefix}-{i}" for i in range(5)]
    tagged = client.stub.ListModels(pb.ListModelsRequest(name_prefix=prefix, tag="team=a"))
    assert [m.name for m in tagged.models] == [f"{prefix}-1", f"{prefix}-3"]


def test_delete_model_refuses_while_aliases_exist_unless_forced(client, model, tmp_path):
    push_bytes(client, model, os.urandom(1000), tmp_path)
    client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="production", version=1))
    assert code_of(client.stub.DeleteModel, pb.DeleteModelRequest(name=model)) == grpc.StatusCode.FAILED_PRECONDITION
    assert client.stub.GetModel(pb.GetModelRequest(name=model)).aliases == {"production": 1}
    assert client.stub.DeleteModel(pb.DeleteModelRequest(name=model, force=True)).deleted_versions == 1
    assert code_of(client.stub.GetModel, pb.GetModelRequest(name=model)) == grpc.StatusCode.NOT_FOUND
    # Numbers are never reused: a model re-created under the same name continues after the last one.
    client.ensure_model(model)
    assert push_bytes(client, model, os.urandom(1000), tmp_path).version == 2


# -- events --------------------------------------------------------------------------------------------------


def test_watcher_reconnecting_with_its_cursor_gets_exactly_the_missed_events(client, model, tmp_path):
    push_bytes(client, model, os.urandom(1000), tmp_path)
    stream = client.stub.WatchEvents(pb.WatchEventsRequest(model_name=model))
    time.sleep(0.5)  # the watch starts from "now": let it take its starting position
    client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="production", version=1))
    first = next(stream)
    stream.cancel()
    assert (first.type, first.alias) == (pb.EVENT_TYPE_ALIAS_SET, "production")

    push_bytes(client, model, os.urandom(1000), tmp_path)
    client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="production", version=2))
    client.stub.UpdateModel(pb.UpdateModelRequest(name=model, description="now with v2"))

    resumed = client.stub.WatchEvents(pb.WatchEventsRequest(model_name=model, cursor=first.cursor), timeout=3)
    missed = [next(resumed) for _ in range(3)]
    assert [(e.type, e.version) for e in missed] == [
        (pb.EVENT_TYPE_VERSION_CREATED, 2),
        (pb.EVENT_TYPE_ALIAS_SET, 2),
        (pb.EVENT_TYPE_MODEL_UPDATED, 0),
    ]
    with pytest.raises(grpc.RpcError) as err:
        next(resumed)  # nothing else happened: the stream waits until its deadline
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "x..y", "", "-lead", "a" * 129, "m@x", "m:1"])
def test_invalid_model_names_are_refused(client, name):
    assert code_of(client.stub.CreateModel, pb.CreateModelRequest(name=name)) == grpc.StatusCode.INVALID_ARGUMENT
    listed = client.stub.ListModels(pb.ListModelsRequest(page=common_pb2.PageRequest(page_size=1000)))
    assert name not in [m.name for m in listed.models]


def test_duplicate_model_is_already_exists(client, model):
    assert code_of(client.stub.CreateModel, pb.CreateModelRequest(name=model)) == grpc.StatusCode.ALREADY_EXISTS


def test_wrong_digest_is_refused_and_leaves_nothing(client, registry, model, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(200_000))
    wrong = sha256_hex(b"something else")
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        client.push_file(model, path, digest=wrong)
    assert client.stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 0
    blob_dir = Path(registry.env["MODELGRID_REGISTRY_BLOB_DIR"])
    assert list((blob_dir / "tmp").iterdir()) == []
    assert not list((blob_dir / "sha256").rglob(sha256_hex(path.read_bytes())))


def test_oversize_upload_is_resource_exhausted(client, model, tmp_path):
    path = tmp_path / "big"
    path.write_bytes(os.urandom(MAX_ARTIFACT + 1))
    with pytest.raises(ResourceExhausted, match="MAX_ARTIFACT_BYTES"):
        client.push_file(model, path)  # declares its size: refused before any byte

    def undeclared():  # a client that does not declare the size is stopped once the limit is crossed
        meta = pb.VersionMetadata(model_name=model, artifact_digest=sha256_hex(path.read_bytes()))
        yield pb.CreateVersionRequest(metadata=meta)
        data = path.read_bytes()
        for start in range(0, len(data), MiB):
            yield pb.CreateVersionRequest(chunk=data[start : start + MiB])

    assert code_of(client.stub.CreateVersion, undeclared()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 0


def test_savedmodel_format_with_a_non_savedmodel_is_invalid(client, model, tmp_path):
    path = tmp_path / "not-a-tar"
    path.write_bytes(b"plain bytes")
    with pytest.raises(InvalidArgument):
        client.push_file(model, path, artifact_format=ArtifactFormat.SAVEDMODEL_TAR)
    assert client.stub.GetModel(pb.GetModelRequest(name=model)).latest_version == 0


def test_first_message_must_be_metadata(client):
    messages = iter([pb.CreateVersionRequest(chunk=b"abc")])
    assert code_of(client.stub.CreateVersion, messages) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "call, request_factory",
    [
        ("GetModel", lambda m: pb.GetModelRequest(name="no-such-model")),
        ("GetVersion", lambda m: pb.GetVersionRequest(model_name=m, version=9)),
        ("Resolve", lambda m: pb.ResolveRequest(ref=ref_to_pb(f"{m}@production"))),
        ("Resolve", lambda m: pb.ResolveRequest(ref=ref_to_pb(m))),
        ("DeleteAlias", lambda m: pb.DeleteAliasRequest(model_name=m, alias="production")),
        ("SetAlias", lambda m: pb.SetAliasRequest(model_name=m, alias="production", version=9)),
        ("UpdateVersion", lambda m: pb.UpdateVersionRequest(model_name=m, version=9, description="x")),
        ("ListVersions", lambda m: pb.ListVersionsRequest(model_name="no-such-model")),
    ],
)
def test_unknown_things_are_not_found_and_change_nothing(client, model, call, request_factory):
    before = client.stub.GetHistory(pb.GetHistoryRequest(model_name=model)).events
    assert code_of(getattr(client.stub, call), request_factory(model)) == grpc.StatusCode.NOT_FOUND
    assert client.stub.GetHistory(pb.GetHistoryRequest(model_name=model)).events == before


@pytest.mark.parametrize(
    "request_",
    [
        pb.SetAliasRequest(model_name="m", alias="Prod!", version=1),
        pb.SetAliasRequest(model_name="m", alias="123", version=1),
        pb.SetAliasRequest(model_name="m", alias="production", version=0),
    ],
)
def test_invalid_alias_requests(client, request_):
    assert code_of(client.stub.SetAlias, request_) == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_cursor_and_page_token(client, model):
    stream = client.stub.WatchEvents(pb.WatchEventsRequest(cursor="not-a-cursor"), timeout=5)
    assert code_of(next, stream) == grpc.StatusCode.INVALID_ARGUMENT
    bad_page = pb.ListVersionsRequest(model_name=model, page=common_pb2.PageRequest(page_token="zzz"))
    assert code_of(client.stub.ListVersions, bad_page) == grpc.StatusCode.INVALID_ARGUMENT


def test_blobs_round_trip_by_digest_and_unknown_digest_is_not_found(client, tmp_path):
    data = os.urandom(2 * MiB + 5)
    source = tmp_path / "dataset.npz"
    source.write_bytes(data)
    info = client.upload_blob(source)
    assert (info.digest, info.size_bytes) == (sha256_hex(data), len(data))
    assert client.stub.StatBlob(pb.StatBlobRequest(digest=info.digest)).size_bytes == len(data)
    header = client.download_blob(info.digest, tmp_path / "copy")
    assert header.artifact.digest == info.digest
    assert (tmp_path / "copy").read_bytes() == data
    unknown = sha256_hex(b"never uploaded")
    assert code_of(client.stub.StatBlob, pb.StatBlobRequest(digest=unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.stub.StatBlob, pb.StatBlobRequest(digest="../x")) == grpc.StatusCode.INVALID_ARGUMENT
