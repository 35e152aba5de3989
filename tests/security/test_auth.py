"""Class 1, auth on by default: a gateway started with its default settings refuses calls without a valid key on both
of its doors (native gRPC and gRPC-Web), a key reaches only the methods of its scopes, only ADMIN manages keys, and
the identity the registry's audit trail records is the key's, whatever `x-modelgrid-client` the caller sent."""

import grpc
import pytest

from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb

MESH = {}  # a registry behind the gateway: every refusal here is the gateway's, before any routing

DOORS = ("gateway", "web")
REGISTRY = "/modelgrid.registry.v1.ModelRegistry"
ADMIN = "/modelgrid.gateway.v1.GatewayAdmin"

WRITES = [  # (method, request): changes state, needs ADMIN (or TRAIN, PREDICT where named)
    (f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name="written-by-a-reader")),
    (f"{REGISTRY}/DeleteModel", rpb.DeleteModelRequest(name="written-by-a-reader")),
    (f"{REGISTRY}/SetAlias", rpb.SetAliasRequest(model_name="written-by-a-reader", alias="production", version=1)),
    ("/modelgrid.predictor.v1.Predictor/Predict", ppb.PredictRequest()),
    ("/modelgrid.predictor.v1.Predictor/LoadModel", ppb.LoadModelRequest(name="written-by-a-reader")),
    ("/modelgrid.trainer.v1.Trainer/SubmitJob", tpb.SubmitJobRequest()),
    ("/modelgrid.trainer.v1.Trainer/CancelJob", tpb.CancelJobRequest(id="any")),
]


@pytest.fixture(scope="module")
def reader(mesh):
    """A key with the READ scope only."""
    return mesh.make_key("dashboard", gpb.SCOPE_READ)


@pytest.fixture(scope="module")
def invalid_keys(mesh) -> list[str]:
    """None, made up, a real key's id with a wrong secret, and a revoked ADMIN key."""
    revoked = mesh.make_key("revoked", gpb.SCOPE_ADMIN)
    mesh.unary("gateway", f"{ADMIN}/RevokeApiKey", gpb.RevokeApiKeyRequest(id=revoked.key.id)).assert_code(
        grpc.StatusCode.OK
    )
    real = mesh.make_key("real", gpb.SCOPE_ADMIN)
    return ["", "nope", f"{real.key.id}.wrong-secret", revoked.secret]


def test_the_default_gateway_keeps_its_admin_key_for_its_operator_only(mesh):
    """Class 1, auth on by default: started without AUTH_ENABLED or ADMIN_KEY, the gateway made a 256-bit admin key
    in a file only its operator can read, and that key works."""
    assert not {"MODELGRID_GATEWAY_AUTH_ENABLED", "MODELGRID_GATEWAY_ADMIN_KEY"} & set(mesh.gateway.env)
    assert mesh.admin_key_file.stat().st_mode & 0o777 == 0o600
    assert mesh.admin_key_file.parent.stat().st_mode & 0o077 == 0
    assert len(mesh.admin_key) > 40
    mesh.unary("gateway", f"{ADMIN}/ListApiKeys", gpb.ListApiKeysRequest()).assert_code(grpc.StatusCode.OK)


@pytest.mark.parametrize("via", DOORS)
@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        (f"{REGISTRY}/GetModel", rpb.GetModelRequest(name="absent")),
        (f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name="anonymous-write")),
        ("/modelgrid.predictor.v1.Predictor/ListModels", ppb.ListModelsRequest()),
        ("/modelgrid.trainer.v1.Trainer/ListJobs", tpb.ListJobsRequest()),
        ("/tensorflow.serving.PredictionService/Predict", b""),
    ],
    ids=["read", "write", "predictor", "trainer", "tf-serving"],
)
def test_calls_without_a_valid_key_are_unauthenticated(mesh, invalid_keys, via, method, request_message):
    """Class 1, anonymous and forged callers: no key, a made-up key, a key of the right form with a wrong secret
    and a revoked key are all UNAUTHENTICATED on the native and the gRPC-Web door, reads and writes alike."""
    for key in invalid_keys:
        mesh.unary(via, method, request_message, key=key).assert_code(grpc.StatusCode.UNAUTHENTICATED)
    assert mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name="anonymous-write")).code == (
        grpc.StatusCode.NOT_FOUND
    ), "a refused write reached the registry"


def test_gateway_admin_calls_without_a_key_are_unauthenticated(mesh):
    """Class 1, anonymous callers on the gateway's own API: the routing table and the keys need a key too."""
    for method, request in [
        ("GetRoutes", gpb.GetRoutesRequest()),
        ("ListApiKeys", gpb.ListApiKeysRequest()),
        ("CreateApiKey", gpb.CreateApiKeyRequest(name="self-made", scopes=[gpb.SCOPE_ADMIN])),
    ]:
        mesh.unary("gateway", f"{ADMIN}/{method}", request, key="").assert_code(grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("via", DOORS)
@pytest.mark.parametrize(("method", "request_message"), WRITES, ids=[m.rsplit("/", 1)[1] for m, _ in WRITES])
def test_a_read_key_cannot_write(mesh, reader, via, method, request_message):
    """Class 1, scope escalation: a READ key calling a method that changes state (registry writes, predictions,
    model loading, training) is PERMISSION_DENIED on both doors, and nothing reaches the backends."""
    mesh.unary(via, method, request_message, key=reader.secret).assert_code(
        grpc.StatusCode.PERMISSION_DENIED, "dashboard"
    )
    reply = mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name="written-by-a-reader"))
    reply.assert_code(grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("via", DOORS)
def test_a_read_key_reads_but_cannot_list_keys(mesh, reader, via):
    """Class 1, scope escalation through a read verb: the READ key is answered on reads (so the refusals above are
    about scope), but ListApiKeys, named like a read, is PERMISSION_DENIED: the keys are ADMIN's alone."""
    mesh.unary(via, f"{REGISTRY}/GetModel", rpb.GetModelRequest(name="absent"), key=reader.secret).assert_code(
        grpc.StatusCode.NOT_FOUND
    )
    mesh.unary(via, f"{REGISTRY}/ListModels", rpb.ListModelsRequest(), key=reader.secret).assert_code(
        grpc.StatusCode.OK
    )
    mesh.unary("gateway", f"{ADMIN}/ListApiKeys", gpb.ListApiKeysRequest(), key=reader.secret).assert_code(
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_only_admin_keys_manage_keys(mesh, reader):
    """Class 1, key management: READ, and even a key with every other scope, cannot list (List* is otherwise a
    read), make or revoke keys, so no key can mint itself an ADMIN one; an ADMIN key can."""
    strong = mesh.make_key("ci-bot", gpb.SCOPE_READ, gpb.SCOPE_PREDICT, gpb.SCOPE_TRAIN)
    victim = mesh.make_key("victim", gpb.SCOPE_PREDICT)
    calls = [
        ("ListApiKeys", gpb.ListApiKeysRequest()),
        ("CreateApiKey", gpb.CreateApiKeyRequest(name="escalated", scopes=[gpb.SCOPE_ADMIN])),
        ("RevokeApiKey", gpb.RevokeApiKeyRequest(id=victim.key.id)),
    ]
    for secret in (reader.secret, strong.secret):
        for method, request in calls:
            mesh.unary("gateway", f"{ADMIN}/{method}", request, key=secret).assert_code(
                grpc.StatusCode.PERMISSION_DENIED
            )
    listed = mesh.unary("gateway", f"{ADMIN}/ListApiKeys", gpb.ListApiKeysRequest()).assert_code(grpc.StatusCode.OK)
    keys = gpb.ListApiKeysResponse.FromString(listed.replies[0]).keys
    assert "escalated" not in {k.name for k in keys}
    assert not next(k for k in keys if k.id == victim.key.id).revoked
    operator = mesh.make_key("operator", gpb.SCOPE_ADMIN)
    for method, request in calls:
        mesh.unary("gateway", f"{ADMIN}/{method}", request, key=operator.secret).assert_code(grpc.StatusCode.OK)


def test_a_key_listing_shows_no_secret(mesh, reader):
    """Class 1, key disclosure: ListApiKeys (ADMIN) never returns a key's secret or hash."""
    listed = mesh.unary("gateway", f"{ADMIN}/ListApiKeys", gpb.ListApiKeysRequest()).assert_code(grpc.StatusCode.OK)
    assert reader.secret.split(".", 1)[1].encode() not in listed.replies[0]


@pytest.mark.parametrize("via", DOORS)
def test_a_forged_client_identity_is_replaced_by_the_keys(mesh, unique, via):
    """Class 1, identity spoofing: a caller sends `x-modelgrid-client: admin` with its own key's call; the gateway
    replaces it, so the registry's audit trail (GetHistory actor, created_by) names the key, not the forged one."""
    key = mesh.make_key(f"release-bot-{via}", gpb.SCOPE_ADMIN)
    name = unique("audited")
    forged = [("x-modelgrid-client", "admin"), ("x-modelgrid-client", "someone-else")]
    mesh.unary(via, f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name=name), key=key.secret, metadata=forged)
    update = rpb.UpdateModelRequest(name=name, set_tags={"stage": "qa"})
    mesh.unary(via, f"{REGISTRY}/UpdateModel", update, key=key.secret, metadata=forged[:1]).assert_code(
        grpc.StatusCode.OK
    )
    history = mesh.unary("direct", f"{REGISTRY}/GetHistory", rpb.GetHistoryRequest(model_name=name))
    events = rpb.GetHistoryResponse.FromString(history.assert_code(grpc.StatusCode.OK).replies[0]).events
    assert [e.actor for e in events] == [f"release-bot-{via}"] * 2, [e.actor for e in events]
