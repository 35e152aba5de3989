"""ReplicaSupervisor: one agent's worker processes, their reserved ports, progress lines and exits (no gRPC here).

Layout of the work directory::

    ports.json                                  port reservations per job (survive an agent restart)
    <job>/<attempt>/task-<i>/spec.json          the worker spec the process reads (--spec)
    <job>/<attempt>/task-<i>/worker.log         its stdout and stderr
    <job>/<attempt>/task-<i>/progress.jsonl     its progress events (MODELGRID_PROGRESS_FILE)
"""

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.clients.agent.types import ReplicaEvent, ReplicaKey, ReplicaState, ReplicaStatus
from services.kit.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.trainer.agent.ports import PortReservations
from services.trainer.agent.progress import ProgressTail
from services.trainer.agent.settings import AgentSettings

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PORTS_PER_JOB = 256
DEFAULT_LOG_LINES = 200
MAX_LOG_LINES = 10_000
MAX_LOG_TAIL_BYTES = 16 * 1024 * 1024
KILL_WAIT_SECONDS = 5.0
SPEC_FILE, LOG_FILE, PROGRESS_FILE = "spec.json", "worker.log", "progress.jsonl"
PROGRESS_FILE_ENV = "MODELGRID_PROGRESS_FILE"


@dataclass(eq=False)
class _Replica:
    key: ReplicaKey
    directory: Path
    process: asyncio.subprocess.Process
    state: ReplicaState = ReplicaState.RUNNING
    exit_code: int = 0
    follower: asyncio.Task | None = None


@dataclass(eq=False)
class _Watch:
    job_id: str
    queue: asyncio.Queue
    overflowed: bool = False
    closed: bool = False


class ReplicaSupervisor:
    """Starts worker processes, follows their progress files and exits, and publishes both to watchers.

    Unusable until `open` (the agent id and work directory are known once the server is bound).
    """

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._work_dir: Path | None = None
        self._ports: PortReservations | None = None
        self._agent_id = ""
        self._replicas: dict[ReplicaKey, _Replica] = {}
        self._watches: set[_Watch] = set()
        self._start_lock = asyncio.Lock()
        self._closing = False

    async def open(self, work_dir: Path, agent_id: str) -> None:
        """Creates the work directory and loads the port reservations kept there."""
        work_dir = work_dir.resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        start, end = self._settings.port_range_start, self._settings.port_range_end
        self._ports = PortReservations(work_dir / "ports.json", start, end)
        self._work_dir, self._agent_id = work_dir, agent_id
        logger.info("agent %s: %d slots, work dir %s", agent_id, self._settings.slots, work_dir)

    def _ready(self) -> tuple[Path, PortReservations]:
        if self._closing:
            raise Unavailable("the agent is shutting down")
        if self._work_dir is None or self._ports is None:
            raise Unavailable("the agent is starting")
        return self._work_dir, self._ports

    # -- ports -------------------------------------------------------------------------------------------------

    def reserve_ports(self, job_id: str, count: int) -> list[int]:
        _, ports = self._ready()
        _check_job_id(job_id)
        if not 1 <= count <= MAX_PORTS_PER_JOB:
            raise InvalidArgument(f"count must be between 1 and {MAX_PORTS_PER_JOB}")
        return ports.reserve(job_id, count)

    def release_ports(self, job_id: str) -> None:
        """Frees the job's ports and forgets its exited replicas (running ones stay listed until released again)."""
        _, ports = self._ready()
        _check_job_id(job_id)
        ports.release(job_id)
        for key, replica in list(self._replicas.items()):
            if key.job_id == job_id and replica.state is ReplicaState.EXITED:
                del self._replicas[key]

    # -- replicas ----------------------------------------------------------------------------------------------

    async def start_replica(self, key: ReplicaKey, tf_config: str, worker_spec: str) -> ReplicaStatus:
        """Starts the worker process of `key`, or returns the one started before (running or exited)."""
        self._ready()
        _check_key(key)
        if tf_config.strip():
            _check_json_object("tf_config", tf_config)
        _check_json_object("worker_spec", worker_spec)
        async with self._start_lock:
            work_dir, _ = self._ready()
            replica = self._replicas.get(key)
            if replica is not None:
                return self._status(replica)
            running = sum(r.state is ReplicaState.RUNNING for r in self._replicas.values())
            if running >= self._settings.slots:
                raise ResourceExhausted(f"all {self._settings.slots} slots of agent {self._agent_id} are taken")
            directory = work_dir / key.job_id / str(key.attempt) / f"task-{key.task_index}"
            replica = _Replica(key, directory, await self._spawn(directory, tf_config, worker_spec))
            self._replicas[key] = replica
        logger.info("started %s pid %d", key, replica.process.pid)
        replica.follower = asyncio.create_task(self._follow(replica), name=f"follow {key}")
        self._publish(replica)
        return self._status(replica)

    async def _spawn(self, directory: Path, tf_config: str, worker_spec: str) -> asyncio.subprocess.Process:
        directory.mkdir(parents=True, exist_ok=True)
        spec_path, progress_path = directory / SPEC_FILE, directory / PROGRESS_FILE
        spec_path.write_text(worker_spec)
        progress_path.write_bytes(b"")  # a fresh start of this replica: no lines of an earlier agent's run
        env = {**os.environ, **self._settings.worker_env, PROGRESS_FILE_ENV: str(progress_path)}
        env.pop("TF_CONFIG", None)
        if tf_config.strip():
            env["TF_CONFIG"] = tf_config
        command = [*self._settings.worker_command, "--spec", str(spec_path)]
        if shutil.which(command[0]) is None:
            raise FailedPrecondition(f"this agent cannot run its worker command: {command[0]!r} is not executable")
        with (directory / LOG_FILE).open("wb") as log:
            try:
                return await asyncio.create_subprocess_exec(
                    *_die_with_parent(),
                    *command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: signals reach it and its children only
                )
            except OSError as exc:
                reason = f"this agent cannot run its worker command {command[0]!r}: {exc.strerror or exc}"
                raise FailedPrecondition(reason) from None

    async def _follow(self, replica: _Replica) -> None:
        """Publishes the progress lines as they appear, then the exit (noticed at once, after the last lines)."""
        tail = ProgressTail(replica.directory / PROGRESS_FILE)
        exit_code = asyncio.ensure_future(replica.process.wait())
        try:
            while not exit_code.done():
                await asyncio.wait({exit_code}, timeout=self._settings.progress_poll_seconds)
                try:
                    lines = tail.read(final=exit_code.done())
                except OSError as exc:  # progress is lost, the exit must not be
                    logger.warning("%s: cannot read %s: %s", replica.key, tail.path, exc)
                    lines = []
                for line in lines:
                    self._publish(replica, line)
        finally:
            exit_code.cancel()
        replica.state, replica.exit_code = ReplicaState.EXITED, exit_code.result()
        _signal_group(replica.process.pid, signal.SIGKILL)  # anything the worker left behind in its group
        logger.info("%s pid %d exited with %d", replica.key, replica.process.pid, replica.exit_code)
        self._publish(replica)

    def stop_replica(self, key: ReplicaKey, kill: bool) -> ReplicaStatus:
        """SIGTERM (a preemption: the worker saves and exits 42) or SIGKILL to the process group; returns at once."""
        replica = self._replicas.get(key)
        if replica is None:
            raise NotFound(f"no replica {key} on this agent")
        if replica.state is ReplicaState.RUNNING:
            logger.info("sending %s to %s pid %d", "SIGKILL" if kill else "SIGTERM", key, replica.process.pid)
            _signal_group(replica.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        return self._status(replica)

    def list_replicas(self, job_id: str = "") -> list[ReplicaStatus]:
        """Running and exited replicas (of one job when given), ordered by job, attempt and task."""
        return [self._status(r) for r in self._matching(job_id)]

    def _matching(self, job_id: str) -> list[_Replica]:
        return [r for key, r in sorted(self._replicas.items()) if not job_id or key.job_id == job_id]

    def _status(self, replica: _Replica) -> ReplicaStatus:
        return ReplicaStatus(replica.key, replica.state, replica.process.pid, replica.exit_code, self._agent_id)

    async def replica_logs(self, job_id: str, task_index: int, tail_lines: int) -> list[str]:
        """The last lines the task's process of the job's latest attempt on this agent wrote."""
        work_dir, _ = self._ready()
        _check_job_id(job_id)
        if task_index < 0 or tail_lines < 0:
            raise InvalidArgument("task_index and tail_lines must not be negative")
        job_dir, task_dir = work_dir / job_id, f"task-{task_index}"
        entries = job_dir.iterdir() if job_dir.is_dir() else ()
        attempts = [int(p.name) for p in entries if p.name.isdigit() and (p / task_dir / LOG_FILE).is_file()]
        if not attempts:
            raise NotFound(f"no log of job {job_id} task {task_index} on this agent")
        path = job_dir / str(max(attempts)) / task_dir / LOG_FILE
        return await asyncio.to_thread(_tail_lines, path, min(tail_lines or DEFAULT_LOG_LINES, MAX_LOG_LINES))

    # -- watchers ----------------------------------------------------------------------------------------------

    async def watch(self, job_id: str = "") -> AsyncIterator[ReplicaEvent]:
        """The current state of each matching replica, then every event as it happens.

        Raises ResourceExhausted when this watcher fell `watch_queue_size` events behind (the others go on) and
        Unavailable when the agent shuts down; a watcher reconnects and starts again from the current state.
        """
        self._ready()
        watch = _Watch(job_id, asyncio.Queue(self._settings.watch_queue_size))
        self._watches.add(watch)  # no await between this and the snapshot below: nothing is missed or repeated
        current = [ReplicaEvent(self._status(r)) for r in self._matching(job_id)]
        try:
            for event in current:
                yield event
            while True:
                if watch.overflowed:
                    raise ResourceExhausted(f"watcher fell more than {watch.queue.maxsize} events behind; reconnect")
                if watch.closed:
                    raise Unavailable("the agent is shutting down")
                event = await watch.queue.get()
                if event is not None:
                    yield event
        finally:
            self._watches.discard(watch)

    def _publish(self, replica: _Replica, progress: str = "") -> None:
        event = ReplicaEvent(self._status(replica), progress)
        for watch in list(self._watches):
            if watch.job_id and watch.job_id != replica.key.job_id:
                continue
            try:
                watch.queue.put_nowait(event)
            except asyncio.QueueFull:
                logger.warning("dropping a WatchReplicas stream that fell %d events behind", watch.queue.maxsize)
                watch.overflowed = True
                self._watches.discard(watch)

    def end_watches(self) -> None:
        """Ends every watch stream and refuses new calls (shutdown has begun)."""
        self._closing = True
        for watch in self._watches:
            watch.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                watch.queue.put_nowait(None)  # wakes a watcher waiting on an empty queue
        self._watches.clear()

    # -- shutdown ----------------------------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """SIGTERM every running worker, SIGKILL those still running after `grace` seconds, and reap them all."""
        self.end_watches()
        async with self._start_lock:  # no start in flight: every process is in the table
            running = [r for r in self._replicas.values() if r.state is ReplicaState.RUNNING]
        followers = {r.follower for r in running if r.follower is not None}
        for replica in running:
            _signal_group(replica.process.pid, signal.SIGTERM)
        if followers:
            logger.info("stopping %d worker(s)", len(running))
            _, pending = await asyncio.wait(followers, timeout=grace)
            if pending:
                for replica in running:
                    if replica.state is ReplicaState.RUNNING:
                        logger.warning("%s pid %d ignored SIGTERM; killing it", replica.key, replica.process.pid)
                        _signal_group(replica.process.pid, signal.SIGKILL)
                await asyncio.wait(pending, timeout=KILL_WAIT_SECONDS)
        for replica in self._replicas.values():
            if replica.follower is not None and not replica.follower.done():
                replica.follower.cancel()


@functools.cache
def _die_with_parent() -> tuple[str, ...]:
    """Command prefix that has the kernel SIGKILL the worker when the agent dies, even of SIGKILL (empty where
    setpriv is missing). Not a prctl in preexec_fn: that makes subprocess fork() without exec in a process full of
    gRPC threads, and children were seen aborting in gRPC's fork handlers before they reached exec."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        logger.warning("setpriv (util-linux) not found: workers outlive an agent that is killed")
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _check_job_id(job_id: str) -> None:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidArgument("job_id must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _check_key(key: ReplicaKey) -> None:
    _check_job_id(key.job_id)
    if key.attempt < 1 or key.task_index < 0:
        raise InvalidArgument("attempt must be positive and task_index not negative")


def _check_json_object(name: str, text: str) -> None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{name} must be a JSON object")


def _tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file, read backwards in blocks (a worker log can be large)."""
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= count and len(data) < MAX_LOG_TAIL_BYTES:
            step = min(64 * 1024, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    if position > 0 and lines:
        lines = lines[1:]  # the first may be cut
    return lines[-count:]
