"""Class 4, watch streams cannot exhaust Redis: each open WatchEvents (registry) or WatchJob (trainer) stream holds a
Redis connection in a blocking read, so a service holds at most max_watch_streams of them and refuses the next with
RESOURCE_EXHAUSTED at once, while its ordinary calls keep finding a connection in a pool barely larger. Opened
directly on each service and through the gateway (native and gRPC-Web), with different API keys so that the
gateway's own per-caller stream limit is not what refuses them."""

import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb

WATCHES = 4
"""max_watch_streams of the registry and of the trainer here."""
POOL = 8
"""Their Redis connection pools: every watch stream holds one, the other calls share what is left."""
MESH = {
    "registry": {"MAX_WATCH_STREAMS": str(WATCHES), "REDIS_MAX_CONNECTIONS": str(POOL)},
    "trainer": {"MAX_WATCH_STREAMS": str(WATCHES), "REDIS_MAX_CONNECTIONS": str(POOL)},
    "gateway": {"MAX_STREAMS_PER_CALLER": "2"},
}
WATCH_EVENTS = "/modelgrid.registry.v1.ModelRegistry/WatchEvents"
WATCH_JOB = "/modelgrid.trainer.v1.Trainer/WatchJob"
ORDINARY_CALLS = 40
SETTLE_S = 0.5
CHURN_CYCLES = 400


@pytest.fixture(scope="module")
def model(mesh, unique) -> str:
    name = unique("watched")
    mesh.registry_client().ensure_model(name)
    return name


@pytest.fixture(scope="module")
def job(mesh, digits_spec) -> str:
    """A job that stays pending (no agent runs here): its watch streams stay open."""
    submitted = mesh.unary(
        "direct", "/modelgrid.trainer.v1.Trainer/SubmitJob", tpb.SubmitJobRequest(spec=digits_spec())
    )
    return tpb.Job.FromString(submitted.assert_code(grpc.StatusCode.OK).replies[0]).id


@pytest.fixture(scope="module")
def keys(mesh) -> Iterator[str]:
    """A new READ key per call: one stream each, well under the gateway's per-caller limit."""
    return (mesh.make_key(f"watcher-{n}", gpb.SCOPE_READ).secret for n in range(1000))


class Watches:
    """Watch streams opened one after another until one is refused; each open one has delivered its first event
    (so the service holds it, in its blocking read of Redis). Cancelled at the end."""

    def __init__(self) -> None:
        self.open: list[grpc.Call] = []
        self.refusal: grpc.RpcError | None = None

    def open_one(self, channel: grpc.Channel, method: str, request, metadata=()) -> grpc.RpcError | None:
        call = channel.unary_stream(method)(request.SerializeToString(), metadata=metadata, timeout=120)
        try:
            next(call)
        except grpc.RpcError as err:
            return err
        self.open.append(call)
        return None

    def until_refused(self, open_one: Callable[[], grpc.RpcError | None], at_least: int, setting: str) -> None:
        """Opens streams until one is refused for `setting` with at least `at_least` open. A refusal before that
        is a stream of an earlier test that the service has not seen closed yet: tried again a moment later."""
        deadline = time.monotonic() + 10
        while len(self.open) <= WATCHES:
            refusal = open_one()
            if refusal is None:
                continue
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
            if (len(self.open) >= at_least and setting in refusal.details()) or time.monotonic() > deadline:
                self.refusal = refusal
                return
            time.sleep(0.2)

    def cancel_all(self) -> None:
        """Cancels the streams once the service waits in its blocking read on each."""
        time.sleep(SETTLE_S)
        for call in self.open:
            call.cancel()
        self.open.clear()


@contextlib.contextmanager
def watches() -> Iterator[Watches]:
    held = Watches()
    try:
        yield held
    finally:
        held.cancel_all()


def assert_refused_at_the_bound(held: Watches, setting: str, internal: int = 0) -> None:
    """The service refused a stream past its bound (`internal`: streams the mesh itself holds there)."""
    assert held.refusal is not None, f"{len(held.open)} watch streams open, none refused"
    assert held.refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, held.refusal.details()
    assert setting in held.refusal.details(), held.refusal.details()
    assert WATCHES - internal <= len(held.open) <= WATCHES, len(held.open)


def all_answered(call: Callable[[], object]) -> None:
    """ORDINARY_CALLS calls at once, ten at a time: every one answered."""
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: call(), range(ORDINARY_CALLS)))
    assert len(results) == ORDINARY_CALLS


def opens_soon(open_one: Callable[[], grpc.RpcError | None]) -> None:
    """A stream opens, once the service has seen the streams closed before it go (cancellation is asynchronous)."""
    deadline = time.monotonic() + 10
    while (refusal := open_one()) is not None:
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
        assert time.monotonic() < deadline, f"no watch stream place came free: {refusal.details()}"
        time.sleep(0.2)


def reopen_after_one_closes(held: Watches, open_one: Callable[[], grpc.RpcError | None]) -> None:
    """A closed stream gives its place back: a new one opens."""
    held.open.pop().cancel()
    opens_soon(open_one)


def get_model(mesh, via: str, name: str, key: str | None = None) -> Callable[[], object]:
    """One GetModel call through `via`, which must be answered."""
    request = rpb.GetModelRequest(name=name)
    method = "/modelgrid.registry.v1.ModelRegistry/GetModel"
    return lambda: mesh.unary(via, method, request, key=key).assert_code(grpc.StatusCode.OK)


def get_job(mesh, via: str, job_id: str) -> Callable[[], object]:
    """One GetJob call through `via`, which must be answered."""
    request = tpb.GetJobRequest(id=job_id)
    return lambda: mesh.unary(via, "/modelgrid.trainer.v1.Trainer/GetJob", request).assert_code(grpc.StatusCode.OK)


def test_registry_watch_streams_are_bounded_directly(mesh, model):
    """Class 4, Redis pool exhaustion on the registry: past MAX_WATCH_STREAMS (4; the gateway's canary watcher
    holds one of them) a direct WatchEvents is RESOURCE_EXHAUSTED at once; 40 concurrent reads and a write still
    find a Redis connection; a closed stream frees its place."""
    request = rpb.WatchEventsRequest(cursor="0", model_name=model)
    with watches() as held:

        def open_one():
            return held.open_one(mesh.channel("registry"), WATCH_EVENTS, request)

        held.until_refused(open_one, WATCHES - 1, "MODELGRID_REGISTRY_MAX_WATCH_STREAMS")
        assert_refused_at_the_bound(held, "MODELGRID_REGISTRY_MAX_WATCH_STREAMS", internal=1)
        all_answered(get_model(mesh, "direct", model))
        update = rpb.UpdateModelRequest(name=model, set_tags={"still": "writable"})
        mesh.unary("direct", "/modelgrid.registry.v1.ModelRegistry/UpdateModel", update).assert_code(grpc.StatusCode.OK)
        mesh.assert_serving("registry")
        reopen_after_one_closes(held, open_one)


def test_registry_watch_streams_are_bounded_through_the_gateway(mesh, model, keys):
    """Class 4, the same attack through the gateway, one stream per API key (so no per-caller limit applies): the
    registry's refusal reaches the caller as RESOURCE_EXHAUSTED on the native and the gRPC-Web door, and ordinary
    calls through both doors are answered meanwhile."""
    request = rpb.WatchEventsRequest(cursor="0", model_name=model)
    with watches() as held:
        held.until_refused(
            lambda: held.open_one(mesh.channel("gateway"), WATCH_EVENTS, request, mesh.bearer(next(keys))),
            WATCHES - 1,
            "MODELGRID_REGISTRY_MAX_WATCH_STREAMS",
        )
        assert_refused_at_the_bound(held, "MODELGRID_REGISTRY_MAX_WATCH_STREAMS", internal=1)
        over_the_web = mesh.web_call(WATCH_EVENTS, [request.SerializeToString()], key=next(keys), timeout=10)
        over_the_web.assert_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "MODELGRID_REGISTRY_MAX_WATCH_STREAMS")
        assert over_the_web.seconds < 5, "refused at once, not at the deadline"
        all_answered(get_model(mesh, "gateway", model, key=next(keys)))
        for _ in range(5):
            get_model(mesh, "web", model)()


def test_trainer_watch_streams_are_bounded_directly(mesh, job):
    """Class 4, Redis pool exhaustion on the trainer: past MAX_WATCH_STREAMS a direct WatchJob is
    RESOURCE_EXHAUSTED at once; 40 concurrent GetJob calls and a ListJobs are still answered."""
    request = tpb.WatchJobRequest(id=job)
    with watches() as held:

        def open_one():
            return held.open_one(mesh.channel("trainer"), WATCH_JOB, request)

        held.until_refused(open_one, WATCHES, "MODELGRID_TRAINER_MAX_WATCH_STREAMS")
        assert_refused_at_the_bound(held, "MODELGRID_TRAINER_MAX_WATCH_STREAMS")
        all_answered(get_job(mesh, "direct", job))
        mesh.unary("direct", "/modelgrid.trainer.v1.Trainer/ListJobs", tpb.ListJobsRequest()).assert_code(
            grpc.StatusCode.OK
        )
        mesh.assert_serving("trainer")
        reopen_after_one_closes(held, open_one)


def test_trainer_watch_streams_are_bounded_through_the_gateway(mesh, job, keys):
    """Class 4, the same attack on the trainer through the gateway (one stream per key), native and gRPC-Web."""
    request = tpb.WatchJobRequest(id=job)
    with watches() as held:
        held.until_refused(
            lambda: held.open_one(mesh.channel("gateway"), WATCH_JOB, request, mesh.bearer(next(keys))),
            WATCHES,
            "MODELGRID_TRAINER_MAX_WATCH_STREAMS",
        )
        assert_refused_at_the_bound(held, "MODELGRID_TRAINER_MAX_WATCH_STREAMS")
        over_the_web = mesh.web_call(WATCH_JOB, [request.SerializeToString()], key=next(keys), timeout=10)
        over_the_web.assert_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "MODELGRID_TRAINER_MAX_WATCH_STREAMS")
        all_answered(get_job(mesh, "gateway", job))


def test_one_key_cannot_hold_every_watch_stream_through_the_gateway(mesh, model):
    """Class 4, one caller taking the whole bound: through the gateway one API key holds at most
    MAX_STREAMS_PER_CALLER (2 here) open streams, so a single key cannot use up the registry's watch streams for
    everyone else; another key still opens one."""
    request = rpb.WatchEventsRequest(cursor="0", model_name=model)
    greedy = mesh.bearer(mesh.make_key("greedy", gpb.SCOPE_READ).secret)
    with watches() as held:
        held.until_refused(
            lambda: held.open_one(mesh.channel("gateway"), WATCH_EVENTS, request, greedy), 2, "MAX_STREAMS_PER_CALLER"
        )
        assert held.refusal is not None and len(held.open) == 2, len(held.open)
        assert held.refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "MAX_STREAMS_PER_CALLER" in held.refusal.details(), held.refusal.details()
        other = mesh.bearer(mesh.make_key("other", gpb.SCOPE_READ).secret)
        opens_soon(lambda: held.open_one(mesh.channel("gateway"), WATCH_EVENTS, request, other))


# -- last in the module: the places it leaks stay taken ---------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="bug: a watch stream the client cancels while the service is still sending it its first event keeps its "
    "max_watch_streams place: gRPC never ends that call (its done callbacks run only at shutdown), so neither "
    "WatchLimits.hold's finally nor its done callback gives the place back; 50 ms between the event and the cancel "
    "and every place comes back",
)
@pytest.mark.parametrize("service", ["registry", "trainer"])
def test_cancelled_streams_give_their_place_back(mesh, model, job, service):
    """Class 4, exhausting the bound itself: a caller that opens a watch stream, reads its first event and cancels
    it, again and again (never holding more than one), must leave the service its places; afterwards every
    place but the mesh's own can be taken again."""
    if service == "registry":
        method, request, internal = WATCH_EVENTS, rpb.WatchEventsRequest(cursor="0", model_name=model), 1
    else:
        method, request, internal = WATCH_JOB, tpb.WatchJobRequest(id=job), 0
    churner = Watches()
    for _ in range(CHURN_CYCLES):
        refusal = churner.open_one(mesh.channel(service), method, request)
        assert refusal is None, f"refused while holding no stream: {refusal.details()}"
        churner.open.pop().cancel()
    time.sleep(2)  # every cancellation has reached the service
    with watches() as held:
        held.until_refused(lambda: held.open_one(mesh.channel(service), method, request), WATCHES - internal, "")
        assert len(held.open) == WATCHES - internal, f"{len(held.open)} places left of {WATCHES - internal}"
