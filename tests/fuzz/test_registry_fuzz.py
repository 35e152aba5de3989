"""Fuzzing the registry: every RPC of modelgrid.registry.v1.ModelRegistry with generated and malformed requests
against a real registry process (session Consul and Redis), then the registry must still be alive and SERVING.

Unary calls get one request; CreateVersion and UploadBlob get streams of messages, generated ones and ones built to
get past the digest check (metadata whose digest and size match the chunks that follow, SavedModel tars with a
generated saved_model.pb, tars cut short or bit-flipped); the downloads are read to their end; WatchEvents, which
never ends by itself, is read for one event under a short deadline of ours."""

import hashlib
import io
import tarfile
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import strategies as st

from modelgrid.client.registry import ArtifactFormat
from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.savedmodel.v1 import savedmodel_pb2 as smpb

pytestmark = pytest.mark.slow  # services as subprocesses (kept in the default run)

SERVICE = pb.DESCRIPTOR.services_by_name["ModelRegistry"]
METHODS = list(SERVICE.methods)
# DeleteModel would delete the model the other targets look things up in; it gets a model of its own per case.
METHODS.sort(key=lambda m: m.name in ("DeleteModel", "DeleteAlias"))
WATCH_S = 0.5  # WatchEvents: one event or this deadline of ours, whichever comes first
TIMEOUT_S = 15.0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def saved_model_proto() -> smpb.SavedModel:
    """A SavedModel graph as the registry reads it: a "serve" meta graph with a float32 [-1, 4] -> [-1, 3]
    signature (the project's subset of TensorFlow's messages; no TensorFlow needed)."""
    shape = smpb.TensorShapeProto(dim=[smpb.TensorShapeProto.Dim(size=-1), smpb.TensorShapeProto.Dim(size=4)])
    signature = smpb.SignatureDef(
        inputs={"x": smpb.TensorInfo(name="serve_x:0", dtype=1, tensor_shape=shape)},
        outputs={"y": smpb.TensorInfo(name="out:0", dtype=1, tensor_shape=shape)},
        method_name="tensorflow/serving/predict",
    )
    graph = smpb.MetaGraphDef(
        meta_info_def=smpb.MetaInfoDef(tags=["serve"]), signature_def={"serving_default": signature}
    )
    return smpb.SavedModel(meta_graphs=[graph])


def tar_of(members: list[tuple[str, str, bytes]], tar_format: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar of (name, kind, data) members; kind "file", "dir", "symlink" or "hardlink" (data: the link target).
    A member that `tar_format` cannot hold (a long name in USTAR) makes a GNU tar."""
    try:
        return _tar_of(members, tar_format)
    except ValueError:
        return _tar_of(members, tarfile.GNU_FORMAT)


def _tar_of(members: list[tuple[str, str, bytes]], tar_format: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = data.decode("utf-8", "replace")
            tar.addfile(info)
    return out.getvalue()


@pytest.fixture(scope="module")
def mesh(consul, redis_server, launch, tmp_path_factory, client_for, channel_to, unique):
    """A registry holding one model with a raw version (1, alias production) and a SavedModel version (2), and a
    stored blob."""
    tmp = tmp_path_factory.mktemp("fuzz-registry")
    registry = launch.registry(consul.http_url, redis_server.url, tmp)
    admin_channel, client = client_for(registry)
    channel = channel_to(registry)
    model = unique("fz")
    client.ensure_model(model)
    raw = tmp / "raw.bin"
    raw.write_bytes(b"raw artifact bytes\n" * 100)
    client.push_file(model, raw)
    tar = tmp / "model.tar"
    tar.write_bytes(tar_of([("saved_model.pb", "file", saved_model_proto().SerializeToString())]))
    client.push_file(model, tar, artifact_format=ArtifactFormat.SAVEDMODEL_TAR)
    client.stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="production", version=1))
    blob = tmp / "blob.bin"
    blob.write_bytes(b"a stored blob\n" * 50)
    stored = client.upload_blob(blob)
    try:
        yield SimpleNamespace(
            registry=registry,
            channel=channel,
            model=model,
            blob_digest=stored.digest,
            artifact_digest=sha256(raw.read_bytes()),
            unique=unique,
            client=client,
        )
    finally:
        channel.close()
        admin_channel.close()
        registry.stop()


def seeds(mesh) -> dict[str, list]:
    """Valid requests per method, for the mutating strategies."""
    m, ref = mesh.model, common_pb2.ModelRef(name=mesh.model, alias="production")
    page = common_pb2.PageRequest(page_size=2)
    return {
        "CreateModel": [pb.CreateModelRequest(name=f"{m}-new", description="d", tags={"k": "v"})],
        "GetModel": [pb.GetModelRequest(name=m)],
        "ListModels": [pb.ListModelsRequest(name_prefix=m[:4], tag="k=v", page=page)],
        "UpdateModel": [pb.UpdateModelRequest(name=m, description="d", set_tags={"k": "v"}, remove_tags=["x"])],
        "DeleteModel": [pb.DeleteModelRequest(name=f"{m}-victim", force=True)],
        "GetVersion": [pb.GetVersionRequest(model_name=m, version=1)],
        "ListVersions": [pb.ListVersionsRequest(model_name=m, status=pb.VERSION_STATUS_READY, page=page)],
        "UpdateVersion": [
            pb.UpdateVersionRequest(model_name=m, version=2, description="d", set_metrics={"acc": 0.5}, set_tags={})
        ],
        "DownloadArtifact": [pb.DownloadArtifactRequest(ref=ref, offset=3)],
        "SetAlias": [pb.SetAliasRequest(model_name=m, alias="canary", version=2, expected_version=0)],
        "DeleteAlias": [pb.DeleteAliasRequest(model_name=m, alias="canary")],
        "Resolve": [pb.ResolveRequest(ref=ref), pb.ResolveRequest(ref=common_pb2.ModelRef(name=m, version=2))],
        "WatchEvents": [pb.WatchEventsRequest(cursor="0", model_name=m), pb.WatchEventsRequest(cursor="$")],
        "GetHistory": [pb.GetHistoryRequest(model_name=m, alias="production", page=page)],
        "StatUpload": [pb.StatUploadRequest(digest=mesh.blob_digest)],
        "StatBlob": [pb.StatBlobRequest(digest=mesh.blob_digest)],
        "DownloadBlob": [pb.DownloadBlobRequest(digest=mesh.blob_digest, offset=1)],
        "CreateVersion": [
            pb.CreateVersionRequest(
                metadata=pb.VersionMetadata(
                    model_name=m, artifact_digest=mesh.blob_digest, from_blob=True, request_id="r1"
                )
            )
        ],
        "UploadBlob": [pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=mesh.blob_digest, size_bytes=700))],
    }


# -- streams built to pass the digest check ---------------------------------------------------------------------


def tars(protofuzz) -> st.SearchStrategy[bytes]:
    """SavedModel-like tars: a saved_model.pb that is a generated or malformed SavedModel message, under names
    and member kinds a tar may hold; sometimes the whole tar cut short or bit-flipped."""
    graph = protofuzz().wire(smpb.SavedModel.DESCRIPTOR, [saved_model_proto()])
    name = st.sampled_from(
        (
            "saved_model.pb",
            "./saved_model.pb",
            "saved_model.pb/",
            "../saved_model.pb",
            "/saved_model.pb",
            "x/saved_model.pb",
        )
    )
    kind = st.sampled_from(("file", "file", "file", "dir", "symlink", "hardlink"))
    extra = st.tuples(
        st.sampled_from(("variables", "variables/variables.index", "a" * 120, "..")), kind, st.binary(max_size=32)
    )
    member = st.tuples(name, kind, graph)
    tar_format = st.sampled_from((tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT))
    whole = st.builds(
        lambda ms, f: tar_of(ms, f), st.lists(st.one_of(member, extra), min_size=1, max_size=3), tar_format
    )

    @st.composite
    def damaged(draw) -> bytes:
        data = bytearray(draw(whole))
        how = draw(st.sampled_from(("truncate", "flip", "as is", "as is")))
        if how == "truncate":
            return bytes(data[: draw(st.integers(0, len(data)))])
        if how == "flip":
            for _ in range(draw(st.integers(1, 3))):
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)

    return damaged()


def upload_streams(protofuzz, mesh, method: str) -> st.SearchStrategy[list[bytes]]:
    """Metadata whose digest and size match the chunks that follow (so the bytes are stored and, for a SavedModel,
    read), mutated now and then, and chunks split anywhere."""
    fuzz = protofuzz(hints=[mesh.model, mesh.blob_digest])
    artifact = st.one_of(st.binary(max_size=256), tars(protofuzz))

    @st.composite
    def stream(draw) -> list[bytes]:
        data = draw(artifact)
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        if method == "CreateVersion":
            fmt = draw(st.sampled_from((pb.ARTIFACT_FORMAT_SAVEDMODEL_TAR, pb.ARTIFACT_FORMAT_RAW, 0, 7)))
            meta = pb.VersionMetadata(
                model_name=mesh.model, artifact_digest=sha256(data), artifact_size=len(data), artifact_format=fmt
            )
            first = pb.CreateVersionRequest(metadata=meta)
            messages = [first, *[pb.CreateVersionRequest(chunk=c) for c in chunks]]
        else:
            first = pb.UploadBlobRequest(metadata=pb.BlobMetadata(digest=sha256(data), size_bytes=len(data)))
            messages = [first, *[pb.UploadBlobRequest(chunk=c) for c in chunks]]
        if draw(st.integers(0, 3)) == 0:
            messages[0] = draw(fuzz.mutated(messages[0]))
        if draw(st.integers(0, 5)) == 0:  # a second metadata message, or chunks first
            messages.insert(draw(st.integers(0, len(messages))), messages[0])
        return [m.SerializeToString() for m in messages]

    return stream()


# -- targets ---------------------------------------------------------------------------------------------------


def hints_of(mesh) -> list[str]:
    return [mesh.model, "production", mesh.blob_digest, mesh.artifact_digest, f"{mesh.model}-victim", "0", "0-0"]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_registry_rpc(method, mesh, fuzz, protofuzz):
    """Every RPC with generated, mutated and malformed requests: never INTERNAL or UNKNOWN, never a hang."""
    strategies = protofuzz(hints=hints_of(mesh), byte_hints=[b"raw artifact bytes\n"])
    case = strategies.case(method, seeds(mesh).get(method.name, ()))
    if method.name in ("CreateVersion", "UploadBlob"):
        case = st.one_of(case, upload_streams(protofuzz, mesh, method.name))
    metadata = st.lists(
        st.tuples(
            st.just("x-modelgrid-client"), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
        ),
        max_size=1,
    )
    watch = method.name == "WatchEvents"

    def body(value) -> None:
        request, headers = value
        if method.name == "DeleteModel":
            mesh.client.ensure_model(f"{mesh.model}-victim")
        fuzz.call_method(
            mesh.channel,
            method,
            request,
            metadata=headers,
            timeout=WATCH_S if watch else TIMEOUT_S,
            max_responses=1 if watch else None,
            deadline_is_ours=watch,  # a watch waits for the next event: our deadline ends it
        )

    fuzz.run(st.tuples(case, metadata), body, services=[mesh.registry])


def test_registry_stays_healthy(mesh, service_health):
    service_health(mesh.registry, mesh.channel)
    # A fuzzed DeleteModel may have named the seed model (a long run hits it): the registry must still make and
    # serve one, whatever the fuzz did to it.
    mesh.client.ensure_model(mesh.model)
    reply = mesh.client.stub.GetModel(pb.GetModelRequest(name=mesh.model), timeout=10)
    assert reply.name == mesh.model
    with pytest.raises(grpc.RpcError) as err:
        mesh.client.stub.GetModel(pb.GetModelRequest(name="a/b"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
