"""Siblings.wait_loaded against real gRPC servers on Unix sockets that answer GetModelMetadata as sibling processes
of a replica would: it returns once every sibling has the versions loaded (or failed), skips a sibling that does not
serve the model or is gone, and gives up after its bound."""

import asyncio
import time

import grpc
import pytest

from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from services.predictor.siblings import Siblings

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Sibling(predictor_pb2_grpc.PredictorServicer):
    """A sibling process's status of one model: version -> state, changed by the test; NOT_FOUND for other models."""

    def __init__(self, model: str, states: dict[int, int]) -> None:
        self.model, self.states, self.asked = model, states, 0

    async def GetModelMetadata(self, request, context):
        self.asked += 1
        if request.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served by this replica")
        versions = [pb.VersionStatus(version=v, state=s) for v, s in self.states.items()]
        return pb.ModelStatus(name=self.model, versions=versions)


@pytest.fixture
async def serve(tmp_path):
    servers = []

    async def serve(name: str, sibling: Sibling) -> str:
        path = str(tmp_path / f"{name}.sock")
        server = grpc.aio.server()
        predictor_pb2_grpc.add_PredictorServicer_to_server(sibling, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        servers.append(server)
        return path

    yield serve
    for server in servers:
        await server.stop(0)


async def test_waits_until_every_sibling_has_the_version_loaded(serve):
    loading = Sibling("m", {1: pb.VERSION_STATE_AVAILABLE, 2: pb.VERSION_STATE_LOADING})
    prepared = Sibling("m", {1: pb.VERSION_STATE_AVAILABLE, 2: pb.VERSION_STATE_PREPARED})
    paths = [await serve("a", loading), await serve("b", prepared)]
    siblings = Siblings(lambda: paths)
    try:
        waiting = asyncio.create_task(siblings.wait_loaded("m", [2], timeout=30))
        deadline = time.monotonic() + 10  # a bound, not a pace: a loaded machine polls slower than every 20 ms
        while loading.asked <= 5:
            assert time.monotonic() < deadline, f"asked {loading.asked} times in 10 s"
            await asyncio.sleep(0.05)
        assert not waiting.done()  # asked again and again while it loads, and still waiting
        loading.states[2] = pb.VERSION_STATE_PREPARED
        started = time.monotonic()
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 2  # within a few polls of the last one loading, far from the 30 s bound
    finally:
        await siblings.close()


async def test_a_failed_version_an_unserved_model_and_a_gone_sibling_are_not_waited_for(serve, tmp_path):
    failed = Sibling("m", {2: pb.VERSION_STATE_FAILED})
    other_model = Sibling("other", {1: pb.VERSION_STATE_AVAILABLE})
    gone = str(tmp_path / "gone.sock")  # a socket path nothing listens on (a process that died)
    paths = [await serve("failed", failed), await serve("other", other_model), gone]
    siblings = Siblings(lambda: paths)
    try:
        started = time.monotonic()
        await siblings.wait_loaded("m", [2], timeout=30)
        assert time.monotonic() - started < 5
    finally:
        await siblings.close()


async def test_gives_up_after_its_bound_when_a_sibling_never_loads(serve, caplog):
    stuck = Sibling("m", {1: pb.VERSION_STATE_AVAILABLE})  # never gets version 2
    paths = [await serve("stuck", stuck)]
    siblings = Siblings(lambda: paths)
    try:
        started = time.monotonic()
        await siblings.wait_loaded("m", [2], timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 3
        assert "had not loaded them after" in caplog.text
    finally:
        await siblings.close()


async def test_no_siblings_means_no_wait():
    siblings = Siblings()
    await asyncio.wait_for(siblings.wait_loaded("m", [1], timeout=30), 1)
