"""Worker agent: a real agent subprocess in a real Consul runs small stand-in worker scripts (and, marked slow, one
real TensorFlow worker); the watch-queue bound is checked on the transport-free core in-process."""

import asyncio
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modelgrid.agent.v1 import agent_pb2 as pb
from modelgrid.agent.v1 import agent_pb2_grpc
from modelgrid.client.errors import ResourceExhausted
from services.clients.agent.types import ReplicaKey, ReplicaState
from services.kit.localinfra import pid_alive
from services.kit.processes import REPO_ROOT, ServiceProcess
from services.trainer.agent.settings import AgentSettings
from services.trainer.agent.supervisor import ReplicaSupervisor

# A stand-in for the TensorFlow worker: `<script> --spec spec.json`, progress lines to $MODELGRID_PROGRESS_FILE
# (each written in two halves, to exercise partial lines), a line on stdout per step, and the exit code its spec
# names. It writes the time of its own exit next to the progress file.
FAKE_WORKER = r"""
import json, os, signal, sys, time

spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
progress_path = os.environ["MODELGRID_PROGRESS_FILE"]
progress = open(progress_path, "a")


def leave(code):
    with open(os.path.join(os.path.dirname(progress_path), "exit-time"), "w") as f:
        f.write(repr(time.time()))
    os._exit(code)


def on_sigterm(*_):
    print("got SIGTERM", flush=True)
    leave(spec.get("sigterm_code", 42))


signal.signal(signal.SIGTERM, signal.SIG_IGN if spec.get("ignore_sigterm") else on_sigterm)


def emit(event, **fields):
    line = json.dumps({"event": event, **fields})
    progress.write(line[: len(line) // 2])
    progress.flush()
    time.sleep(spec.get("half_line_pause", 0))
    progress.write(line[len(line) // 2 :] + "\n")
    progress.flush()


emit("started", tf_config=os.environ.get("TF_CONFIG", ""), legacy_keras=os.environ.get("TF_USE_LEGACY_KERAS"))
for step in range(1, spec.get("steps", 3) + 1):
    print(f"stdout line {step}", flush=True)
    emit("step", step=step)
    time.sleep(spec.get("step_seconds", 0.05))
if spec.get("hang"):
    while True:
        signal.pause()
leave(spec.get("exit_code", 0))
"""

CALL_TIMEOUT = 10


@pytest.fixture
def fake_worker(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


class Agent:
    """An agent subprocess with a channel to it."""

    def __init__(self, process: ServiceProcess, work_dir: Path) -> None:
        self.process = process
        self.work_dir = work_dir
        self.channel = process.channel(identity="trainer")  # the agents accept only the trainer
        self.stub = agent_pb2_grpc.WorkerAgentStub(self.channel)

    def start(self, job: str, task: int = 0, attempt: int = 1, tf_config: str = "", **spec) -> pb.Replica:
        request = pb.StartReplicaRequest(
            job_id=job, attempt=attempt, task_index=task, tf_config=tf_config, worker_spec=json.dumps(spec)
        )
        return self.stub.StartReplica(request, timeout=CALL_TIMEOUT)

    def stop(self, job: str, task: int = 0, attempt: int = 1, kill: bool = False) -> pb.Replica:
        request = pb.StopReplicaRequest(job_id=job, attempt=attempt, task_index=task, kill=kill)
        return self.stub.StopReplica(request, timeout=CALL_TIMEOUT)

    def reserve(self, job: str, count: int) -> list[int]:
        return list(self.stub.ReservePorts(pb.ReservePortsRequest(job_id=job, count=count), timeout=CALL_TIMEOUT).ports)

    def close(self) -> None:
        self.channel.close()
        self.process.stop()


@pytest.fixture
def agents(consul, internal_tls_dir, tmp_path: Path, fake_worker: list[str]) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(work_dir: Path | None = None, worker: list[str] | None = None, **settings: str) -> Agent:
        work_dir = work_dir or tmp_path / f"agent-{len(started)}"
        env = {
            "CONSUL_URL": consul.http_url,
            "CONSUL_CHECK_INTERVAL": "1s",
            "WORK_DIR": str(work_dir),
            "WORKER_COMMAND": json.dumps(worker or fake_worker),
            "WORKER_STOP_GRACE_SECONDS": "2",
            **settings,
        }
        log = tmp_path / f"agent-{len(started)}.log"
        started.append(
            Agent(
                ServiceProcess(
                    "services.trainer.agent", "MODELGRID_AGENT_", env, log, internal_tls_dir=internal_tls_dir
                ).start(),
                work_dir,
            )
        )
        return started[-1]

    yield start
    for agent in started:
        agent.close()


class Watcher:
    """A WatchReplicas stream read by a thread: each event (or the error ending it) with the time it arrived."""

    def __init__(self, agent: Agent, job: str = "") -> None:
        self.call = agent.stub.WatchReplicas(pb.WatchReplicasRequest(job_id=job))
        self.received: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.received.put((time.time(), event))
            self.received.put((time.time(), EOFError("the stream ended without an error")))
        except grpc.RpcError as exc:
            self.received.put((time.time(), exc))

    def next(self, timeout: float = 10) -> tuple[float, pb.ReplicaEvent]:
        arrived, item = self.received.get(timeout=timeout)
        if isinstance(item, grpc.RpcError | EOFError):
            raise item
        return arrived, item

    def until_exit(self, task: int = 0, timeout: float = 15) -> list[tuple[float, pb.ReplicaEvent]]:
        """Events up to and including the EXITED event of `task`."""
        deadline = time.monotonic() + timeout
        events = []
        while True:
            events.append(self.next(max(deadline - time.monotonic(), 0.01)))
            replica = events[-1][1].replica
            if replica.task_index == task and replica.state == pb.REPLICA_STATE_EXITED:
                return events

    def progress(self, task: int = 0, timeout: float = 10) -> dict:
        """The next progress line of `task`."""
        deadline = time.monotonic() + timeout
        while True:
            _, event = self.next(max(deadline - time.monotonic(), 0.01))
            if event.progress and event.replica.task_index == task:
                return json.loads(event.progress)

    def first_progress(self, tasks: int, timeout: float = 10) -> dict[int, dict]:
        """The first progress line of each of tasks 0..tasks-1, whatever order their lines arrive in."""
        deadline = time.monotonic() + timeout
        firsts: dict[int, dict] = {}
        while len(firsts) < tasks:
            _, event = self.next(max(deadline - time.monotonic(), 0.01))
            if event.progress:
                firsts.setdefault(event.replica.task_index, json.loads(event.progress))
        return firsts

    def cancel(self) -> None:
        self.call.cancel()


def replica_dir(agent: Agent, job: str, task: int = 0, attempt: int = 1) -> Path:
    return agent.work_dir / job / str(attempt) / f"task-{task}"


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# -- Consul --------------------------------------------------------------------------------------------------


def test_registers_in_consul_with_its_slots_and_turns_passing(consul, agents):
    agent = agents(SLOTS="3")

    def passing() -> dict[int, dict]:
        reply = httpx.get(
            f"{consul.http_url}/v1/health/service/trainer-agent",
            params={"passing": "true"},
            headers={"X-Consul-Token": consul.master_token},
        )
        return {entry["Service"]["Port"]: entry["Service"] for entry in reply.json()}

    wait_until("the agent passing in Consul", lambda: agent.process.port in passing(), timeout=20)
    service = passing()[agent.process.port]
    assert service["Meta"]["slots"] == "3" and service["Meta"]["host"] == "127.0.0.1"
    assert service["Address"] == "127.0.0.1"

    assert agent.process.terminate() == 0
    catalog = httpx.get(
        f"{consul.http_url}/v1/catalog/service/trainer-agent", headers={"X-Consul-Token": consul.master_token}
    ).json()
    assert agent.process.port not in {s["ServicePort"] for s in catalog}


# -- ports ---------------------------------------------------------------------------------------------------


def test_reserved_ports_are_stable_per_job_disjoint_across_jobs_and_survive_a_restart(agents, tmp_path: Path):
    work_dir = tmp_path / "agent-work"
    agent = agents(work_dir)
    a = agent.reserve("job-a", 3)
    assert len(set(a)) == 3 and agent.reserve("job-a", 3) == a
    b = agent.reserve("job-b", 2)
    assert len(set(b)) == 2 and not set(a) & set(b)
    grown = agent.reserve("job-a", 5)
    assert grown[:3] == a and not set(grown) & set(b) and len(set(grown)) == 5
    assert agent.reserve("job-a", 2) == a[:2]  # shrinking keeps the first ones
    with pytest.raises(grpc.RpcError) as err:
        agent.reserve("job-a", 0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        agent.reserve("../escape", 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    agent.close()
    restarted = agents(work_dir)
    assert restarted.reserve("job-a", 2) == a[:2] and restarted.reserve("job-b", 2) == b
    restarted.stub.ReleasePorts(pb.ReleasePortsRequest(job_id="job-b"), timeout=CALL_TIMEOUT)
    assert restarted.reserve("job-a", 2) == a[:2]


def test_a_port_range_bounds_the_reservations(agents):
    start = 47100
    agent = agents(PORT_RANGE_START=str(start), PORT_RANGE_END=str(start + 9))
    ports = agent.reserve("job-a", 4)
    assert all(start <= p <= start + 9 for p in ports)
    with pytest.raises(grpc.RpcError) as err:
        agent.reserve("job-b", 10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- replicas ------------------------------------------------------------------------------------------------


def test_watch_gets_progress_in_order_then_the_exit_code_within_a_second(agents):
    agent = agents()
    watcher = Watcher(agent, "job-1")
    tf_config = json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    replica = agent.start("job-1", tf_config=tf_config, steps=4, exit_code=7, half_line_pause=0.3)
    assert replica.state == pb.REPLICA_STATE_RUNNING and replica.pid > 0 and replica.agent
    events = watcher.until_exit()
    watcher.cancel()

    lines = [json.loads(e.progress) for _, e in events if e.progress]
    assert [line["event"] for line in lines] == ["started", "step", "step", "step", "step"]
    assert [line["step"] for line in lines[1:]] == [1, 2, 3, 4]
    assert lines[0]["tf_config"] == tf_config and lines[0]["legacy_keras"] == "1"
    assert all(e.replica.state == pb.REPLICA_STATE_RUNNING for _, e in events[:-1])
    arrived, exited = events[-1]
    assert exited.replica.exit_code == 7 and exited.replica.pid == replica.pid and not exited.progress
    exit_time = float((replica_dir(agent, "job-1") / "exit-time").read_text())
    assert arrived - exit_time < 1.0, f"exit seen {arrived - exit_time:.2f}s after it happened"

    # A new watcher first gets the current state of each replica, without progress.
    late = Watcher(agent, "job-1")
    _, current = late.next()
    late.cancel()
    assert current.replica.state == pb.REPLICA_STATE_EXITED and current.replica.exit_code == 7 and not current.progress
    listed = agent.stub.ListReplicas(pb.ListReplicasRequest(job_id="job-1"), timeout=CALL_TIMEOUT).replicas
    assert [(r.task_index, r.state, r.exit_code) for r in listed] == [(0, pb.REPLICA_STATE_EXITED, 7)]

    # Releasing the job's ports forgets its exited replicas.
    agent.stub.ReleasePorts(pb.ReleasePortsRequest(job_id="job-1"), timeout=CALL_TIMEOUT)
    assert not agent.stub.ListReplicas(pb.ListReplicasRequest(job_id="job-1"), timeout=CALL_TIMEOUT).replicas


def test_stop_with_kill_and_with_sigterm(agents):
    agent = agents()
    watcher = Watcher(agent, "job-stop")
    agent.start("job-stop", task=0, hang=True)
    agent.start("job-stop", task=1, hang=True)
    firsts = watcher.first_progress(tasks=2)  # the two workers' lines arrive in either order
    assert {task: line["event"] for task, line in firsts.items()} == {0: "started", 1: "started"}  # handlers installed

    stopped = agent.stop("job-stop", task=0, kill=True)
    assert stopped.task_index == 0 and stopped.state in (pb.REPLICA_STATE_RUNNING, pb.REPLICA_STATE_EXITED)
    assert watcher.until_exit(task=0)[-1][1].replica.exit_code == -signal.SIGKILL
    agent.stop("job-stop", task=1)
    assert watcher.until_exit(task=1)[-1][1].replica.exit_code == 42
    watcher.cancel()

    again = agent.stop("job-stop", task=1, kill=True)  # stopping an exited replica just returns it
    assert again.state == pb.REPLICA_STATE_EXITED and again.exit_code == 42
    with pytest.raises(grpc.RpcError) as err:
        agent.stop("job-stop", task=7)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_slots_limit_idempotent_start_and_bad_json(agents):
    agent = agents(SLOTS="2")
    first = agent.start("job-slots", task=0, hang=True)
    assert agent.start("job-slots", task=0, hang=True).pid == first.pid  # the same replica, not a second process
    agent.start("job-slots", task=1, hang=True)
    with pytest.raises(grpc.RpcError) as err:
        agent.start("job-slots", task=2, hang=True)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = agent.stub.ListReplicas(pb.ListReplicasRequest(), timeout=CALL_TIMEOUT).replicas
    assert [(r.task_index, r.state) for r in listed] == [(0, pb.REPLICA_STATE_RUNNING), (1, pb.REPLICA_STATE_RUNNING)]

    for request in (
        pb.StartReplicaRequest(job_id="job-bad", attempt=1, worker_spec="{not json"),
        pb.StartReplicaRequest(job_id="job-bad", attempt=1, worker_spec="{}", tf_config="[1, 2]"),
        pb.StartReplicaRequest(job_id="job-bad", attempt=0, worker_spec="{}"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            agent.stub.StartReplica(request, timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A slot frees when its replica has exited.
    watcher = Watcher(agent, "job-slots")
    agent.stop("job-slots", task=1, kill=True)
    watcher.until_exit(task=1)
    watcher.cancel()
    assert agent.start("job-slots", task=2, steps=1).state == pb.REPLICA_STATE_RUNNING


def test_replica_logs_return_the_last_lines_of_the_latest_attempt(agents):
    agent = agents()
    watcher = Watcher(agent, "job-logs")
    agent.start("job-logs", attempt=1, steps=2)
    watcher.until_exit()
    agent.start("job-logs", attempt=2, steps=5)
    watcher.until_exit()
    watcher.cancel()

    def logs(tail: int, task: int = 0) -> list[str]:
        request = pb.ReplicaLogsRequest(job_id="job-logs", task_index=task, tail_lines=tail)
        return list(agent.stub.ReplicaLogs(request, timeout=CALL_TIMEOUT).lines)

    assert logs(0) == [f"stdout line {i}" for i in range(1, 6)]
    assert logs(2) == ["stdout line 4", "stdout line 5"]
    with pytest.raises(grpc.RpcError) as err:
        logs(10, task=3)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_agent_sigterm_leaves_no_worker_alive(agents):
    agent = agents(WORKER_STOP_GRACE_SECONDS="1")
    watcher = Watcher(agent, "job-term")
    polite = agent.start("job-term", task=0, hang=True)
    stubborn = agent.start("job-term", task=1, hang=True, ignore_sigterm=True)
    watcher.first_progress(tasks=2)

    started = time.monotonic()
    assert agent.process.terminate(timeout=30) == 0
    assert time.monotonic() - started < 10  # the open watch stream did not hold the shutdown
    with pytest.raises(grpc.RpcError) as err:
        while True:
            watcher.next()
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    wait_until("the workers gone", lambda: not pid_alive(polite.pid) and not pid_alive(stubborn.pid), timeout=5)
    assert "got SIGTERM" in (replica_dir(agent, "job-term", 0) / "worker.log").read_text()


def test_agent_killed_takes_its_workers_with_it(agents):
    agent = agents()
    watcher = Watcher(agent, "job-orphan")
    replica = agent.start("job-orphan", hang=True, ignore_sigterm=True)
    watcher.progress(0)
    agent.process.kill()
    wait_until("the worker gone after the agent was killed", lambda: not pid_alive(replica.pid), timeout=5)


# -- the core, in-process --------------------------------------------------------------------------------------


async def test_a_slow_watcher_is_dropped_while_others_get_every_event(tmp_path: Path, fake_worker: list[str]):
    settings = AgentSettings(port=0, consul_enabled=False, worker_command=fake_worker, watch_queue_size=4)
    supervisor = ReplicaSupervisor(settings)
    await supervisor.open(tmp_path / "work", "agent-test")
    slow, fast = supervisor.watch("job-w"), supervisor.watch("job-w")
    try:
        first = [asyncio.create_task(anext(watch)) for watch in (slow, fast)]
        await asyncio.sleep(0.01)  # both subscribed (no replica yet, so nothing to read)
        # A line every 0.25 s: a reader that keeps up never has more than a poll's worth (one or two) queued.
        await supervisor.start_replica(ReplicaKey("job-w", 1, 0), "", json.dumps({"steps": 6, "step_seconds": 0.25}))
        for task in first:
            assert (await task).replica.state is ReplicaState.RUNNING
        seen = []
        async for event in fast:
            seen.append(event)
            if event.replica.state is ReplicaState.EXITED:
                break
        assert [json.loads(e.progress)["event"] for e in seen[:-1]] == ["started"] + ["step"] * 6
        assert seen[-1].replica.exit_code == 0 and not seen[-1].progress
        with pytest.raises(ResourceExhausted):
            await anext(slow)
    finally:
        await fast.aclose()
        await supervisor.close(1)


@pytest.mark.slow
def test_real_tensorflow_worker_trains_and_exports(agents, tmp_path: Path):
    agent = agents(worker=[sys.executable, "-m", "services.trainer.worker"])
    (port,) = agent.reserve("job-tf", 1)
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}})
    spec = {
        "recipe": "mlp",
        "recipe_params": {"hidden_units": [32]},
        "dataset": {"path": str(REPO_ROOT / "data" / "digits" / "digits.npz"), "format": "npz", "num_classes": 10},
        "epochs": 1,
        "batch_size": 64,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "export_dir": str(tmp_path / "export"),
    }
    watcher = Watcher(agent, "job-tf")
    agent.start("job-tf", tf_config=tf_config, **spec)
    events = watcher.until_exit(timeout=180)
    watcher.cancel()
    kinds = [json.loads(e.progress)["event"] for _, e in events if e.progress]
    logs = agent.stub.ReplicaLogs(pb.ReplicaLogsRequest(job_id="job-tf", tail_lines=30), timeout=CALL_TIMEOUT).lines
    assert events[-1][1].replica.exit_code == 0, "\n".join(logs)
    assert kinds[0] == "started" and "epoch" in kinds and "exported" in kinds and kinds[-1] == "finished", kinds
    assert (tmp_path / "export" / "saved_model.pb").exists()
