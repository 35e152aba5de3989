"""The client library's channels against a real gRPC server in this process (a registry servicer whose calls fail
on demand): idempotent calls are retried on UNAVAILABLE with backoff and the others never are, the API key reaches
the server on blocking and asyncio channels, and bad options are refused before anything is sent."""

import re
import threading
from concurrent import futures

import grpc
import pytest

from modelgrid.client import AsyncRegistryClient, RegistryClient, Retry, aio_connect, connect
from modelgrid.client.channels import IDEMPOTENT, public_tls
from modelgrid.client.errors import Unavailable
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.kit.processes import REPO_ROOT

FAST = Retry(attempts=4, initial_backoff=0.01, maximum_backoff=0.05)


class FlakyRegistry(registry_pb2_grpc.ModelRegistryServicer):
    """GetModel and CreateModel fail UNAVAILABLE `failures` times, then answer; every call and its metadata is
    recorded."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def _answer(self, method: str, name: str, context: grpc.ServicerContext) -> pb.RegisteredModel:
        with self._lock:
            self.calls.append((method, dict(context.invocation_metadata())))
            failing = self.failures > 0
            self.failures -= failing
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.RegisteredModel(name=name)

    def GetModel(self, request, context):
        return self._answer("GetModel", request.name, context)

    def CreateModel(self, request, context):
        return self._answer("CreateModel", request.name, context)


@pytest.fixture(scope="module")
def server():
    servicer = FlakyRegistry()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer, f"127.0.0.1:{port}"
    grpc_server.stop(None)


@pytest.fixture
def flaky(server):
    servicer, target = server
    servicer.failures, servicer.calls = 0, []
    return servicer, target


def test_an_idempotent_call_is_retried_until_it_succeeds(flaky):
    servicer, target = flaky
    servicer.failures = 2
    with connect(target, retry=FAST) as channel:
        assert RegistryClient(channel).get_model("m").name == "m"
    assert [method for method, _ in servicer.calls] == ["GetModel"] * 3


def test_retries_stop_at_the_policy_attempts(flaky):
    servicer, target = flaky
    servicer.failures = 10
    with connect(target, retry=FAST) as channel, pytest.raises(Unavailable):
        RegistryClient(channel).get_model("m")
    assert len(servicer.calls) == 4


def test_a_call_that_changes_state_is_never_repeated(flaky):
    servicer, target = flaky
    servicer.failures = 1
    with connect(target, retry=FAST) as channel, pytest.raises(grpc.RpcError) as failure:
        RegistryClient(channel).stub.CreateModel(pb.CreateModelRequest(name="m"), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [method for method, _ in servicer.calls] == ["CreateModel"]


def test_one_attempt_turns_retries_off(flaky):
    servicer, target = flaky
    servicer.failures = 1
    with connect(target, retry=Retry(attempts=1)) as channel, pytest.raises(Unavailable):
        RegistryClient(channel).get_model("m")
    assert len(servicer.calls) == 1


def test_the_api_key_is_on_every_call(flaky):
    servicer, target = flaky
    with connect(target, api_key="mg_secret") as channel:
        RegistryClient(channel, client_id="sdk-test").get_model("m")
    headers = servicer.calls[-1][1]
    assert headers["authorization"] == "Bearer mg_secret"
    assert headers["x-modelgrid-client"] == "sdk-test"


async def test_asyncio_channels_carry_the_key_and_retry(flaky):
    servicer, target = flaky
    servicer.failures = 1
    async with aio_connect(target, api_key="mg_async", retry=FAST) as channel:
        assert (await AsyncRegistryClient(channel).get_model("m")).name == "m"
    assert len(servicer.calls) == 2
    assert all(headers["authorization"] == "Bearer mg_async" for _, headers in servicer.calls)


def declared_methods() -> dict[str, set[str]]:
    """Every gRPC method of protos/, by "package.Service" (read from the .proto files: importing the Open Inference
    Protocol's modules here would clash with tritonclient.grpc, which other test modules load)."""
    services: dict[str, set[str]] = {}
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.MULTILINE).group(1)
        for service, body in re.findall(r"^service\s+(\w+)\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL):
            services[f"{package}.{service}"] = set(re.findall(r"^\s*rpc\s+(\w+)\s*\(", body, re.MULTILINE))
    return services


def test_every_retried_method_exists():
    """The retry policy names services and methods by string: each must be a real method of the protocols."""
    declared = declared_methods()
    for service, methods in IDEMPOTENT.items():
        assert set(methods) <= declared[service], (service, set(methods) - declared[service])


def test_bad_options_are_refused_before_connecting(tmp_path):
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=9)
    for backoffs in [(2, 1), (1e-5, 1e-5), (1, 1e16)]:
        with pytest.raises(ValueError, match="backoff"):
            Retry(initial_backoff=backoffs[0], maximum_backoff=backoffs[1])
    with pytest.raises(ValueError, match="tls=True"):
        connect("127.0.0.1:1", ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="without spaces"):
        connect("127.0.0.1:1", api_key="two words")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match="no PEM certificate"):
        public_tls(not_pem)
