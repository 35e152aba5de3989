"""ReplicaSupervisor: one agent's worker processes, their reserved ports, progress lines and exits (no gRPC here).

A trainer job's replica (started with ReplicaData) is prepared before its process starts: the agent fetches the
data set into its blob cache and the checkpoint to resume from into the replica's own checkpoint dir, and writes
the worker spec with paths of this host only. While the worker runs, the agent uploads the checkpoint snapshots
and the SavedModel it announces (progress events `checkpoint` and `exported`: the chief's) and reports them on
the replica; the exit is reported once those uploads ended.

Layout of the work directory::

    ports.json                                  port reservations per job (survive an agent restart)
    cache/                                      registry blobs (services.trainer.agent.storage)
    <job>/<attempt>/task-<i>/spec.json          the worker spec the process reads (--spec)
    <job>/<attempt>/task-<i>/worker.log         its stdout and stderr, after the agent's notes on preparing it
    <job>/<attempt>/task-<i>/progress.jsonl     its progress events (MODELGRID_PROGRESS_FILE)
    <job>/<attempt>/task-<i>/checkpoints/       its checkpoint dir (backup/chief: restored; snapshots/: to upload)
    <job>/<attempt>/task-<i>/export/            the SavedModel it writes (the chief)
    <job>/<attempt>/task-<i>/recipes/           a file recipe's source, as the trainer sent it (a registry recipe's
                                                under registry/<name>/<version>.py)
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
from dataclasses import dataclass, field
from pathlib import Path

from modelgrid.client.artifacts import check_digest
from modelgrid.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelgridError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from modelgrid.client.registry import AsyncRegistryClient
from services.clients.agent.types import ReplicaData, ReplicaEvent, ReplicaKey, ReplicaState, ReplicaStatus
from services.clients.agent.worker_spec import MAX_RECIPE_SOURCE_BYTES, WorkerSpec
from services.trainer.agent.ports import PortReservations
from services.trainer.agent.progress import ProgressTail
from services.trainer.agent.settings import AgentSettings
from services.trainer.agent.storage import BlobCache, OutputUploads, restore_checkpoint
from services.trainer.exit_codes import ExitCode
from services.trainer.progress import CheckpointSaved, Exported, ProgressEvent
from services.trainer.worker import FILE_PREFIX

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PORTS_PER_JOB = 256
DEFAULT_LOG_LINES = 200
MAX_LOG_LINES = 10_000
MAX_LOG_TAIL_BYTES = 16 * 1024 * 1024
KILL_WAIT_SECONDS = 5.0
SPEC_FILE, LOG_FILE, PROGRESS_FILE = "spec.json", "worker.log", "progress.jsonl"
CHECKPOINT_DIR, EXPORT_DIR, RECIPES_DIR = "checkpoints", "export", "recipes"
PROGRESS_FILE_ENV = "MODELGRID_PROGRESS_FILE"


@dataclass(eq=False)
class _Replica:
    key: ReplicaKey
    directory: Path
    process: asyncio.subprocess.Process | None = None
    """None while the agent prepares the replica (fetches its data)."""
    state: ReplicaState = ReplicaState.RUNNING
    exit_code: int = 0
    follower: asyncio.Task | None = None
    uploads: OutputUploads | None = None
    """A trainer job's replica: what it announces is uploaded to the registry."""
    error: str = ""
    stop_signal: int = 0
    """A stop asked for while the replica was being prepared (its process never starts)."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


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

    def __init__(self, settings: AgentSettings, registry: AsyncRegistryClient | None = None) -> None:
        self._settings = settings
        self._registry = registry
        self._cache: BlobCache | None = None
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
        if self._registry is not None:
            self._cache = BlobCache(work_dir / "cache", self._registry, self._settings.registry_retry_seconds)
            self._cache.open()
        self._work_dir, self._agent_id = work_dir, agent_id
        logger.info("agent %s: %d slots, work dir %s", agent_id, self._settings.slots, work_dir)

    @property
    def cache(self) -> BlobCache | None:
        """The registry blobs on this host (None without a registry client)."""
        return self._cache

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

    async def release_ports(self, job_id: str) -> None:
        """Frees the job's ports and forgets its exited replicas (running ones stay listed until released again),
        and removes their checkpoints and exports from this host (their logs stay)."""
        _, ports = self._ready()
        _check_job_id(job_id)
        ports.release(job_id)
        done = []
        for key, replica in list(self._replicas.items()):
            if key.job_id == job_id and replica.state is ReplicaState.EXITED:
                del self._replicas[key]
                done.append(replica.directory)
        await asyncio.to_thread(_remove_outputs, done)

    # -- replicas ----------------------------------------------------------------------------------------------

    async def start_replica(
        self, key: ReplicaKey, tf_config: str, worker_spec: str, data: ReplicaData | None = None
    ) -> ReplicaStatus:
        """Starts the worker process of `key`, or returns the one started before (running or exited). With `data`
        (a trainer job's replica), `worker_spec` is a WorkerSpec template that names no path: the replica is
        prepared first (RUNNING, pid 0), and its process started once its data is here."""
        self._ready()
        _check_key(key)
        if tf_config.strip():
            _check_json_object("tf_config", tf_config)
        template = self._template(worker_spec, data) if data is not None else None
        if template is None:
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
            if template is None:
                replica = _Replica(key, directory, await self._spawn(directory, tf_config, worker_spec))
            else:
                replica = _Replica(key, directory)
            self._replicas[key] = replica
        if template is not None and data is not None:
            logger.info("preparing %s", key)
            run = self._prepare_and_run(replica, tf_config, template, data)
            replica.follower = asyncio.create_task(run, name=f"run {key}")
        else:
            logger.info("started %s pid %d", key, replica.pid)
            replica.follower = asyncio.create_task(self._follow(replica), name=f"follow {key}")
        self._publish(replica)
        return self._status(replica)

    def _template(self, worker_spec: str, data: ReplicaData) -> WorkerSpec:
        """The trainer's spec of a replica, checked: no path of the trainer's host, a sound recipe to write."""
        if self._registry is None or self._cache is None:
            raise FailedPrecondition("this agent has no registry client: it cannot fetch a trainer job's data")
        check_digest(data.dataset_digest)
        if data.restore is not None:
            check_digest(data.restore.digest)
        try:
            template = WorkerSpec.from_json(worker_spec, template=True)
        except ValueError as exc:
            raise InvalidArgument(f"worker_spec: {exc}") from None
        if template.recipe.startswith(FILE_PREFIX):
            _recipe_target(Path("/recipes"), template.recipe[len(FILE_PREFIX) :])
            if len(template.recipe_source.encode()) > MAX_RECIPE_SOURCE_BYTES:
                raise InvalidArgument(f"recipe_source is larger than {MAX_RECIPE_SOURCE_BYTES} bytes")
        return template

    async def _prepare_and_run(
        self, replica: _Replica, tf_config: str, template: WorkerSpec, data: ReplicaData
    ) -> None:
        """Fetches the replica's data, starts its process and follows it; an exit code says why when it cannot."""
        preparing = asyncio.ensure_future(self._prepare(replica, template, data))
        stopped = asyncio.ensure_future(replica.stopped.wait())
        try:
            await asyncio.wait({preparing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not preparing.done():
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
        if replica.stop_signal:
            self._note(replica, f"stopped (signal {replica.stop_signal}) before the worker started")
            self._exited(replica, -replica.stop_signal)
            return
        try:
            spec = preparing.result()
            replica.process = await self._spawn(replica.directory, tf_config, spec.to_json(), append_log=True)
        except Exception as exc:  # noqa: BLE001 - what stops a preparation is the replica's exit, never the agent's
            unusable = isinstance(exc, NotFound | InvalidArgument | FailedPrecondition | ValueError)
            replica.error = f"preparing the worker failed: {exc}"
            if isinstance(exc, ModelgridError | OSError | ValueError):
                logger.warning("%s: %s", replica.key, replica.error)
            else:
                logger.exception("%s: %s", replica.key, replica.error)
            self._note(replica, replica.error)
            self._exited(replica, ExitCode.INVALID_SPEC if unusable else ExitCode.NO_DATA)
            return
        logger.info("started %s pid %d", replica.key, replica.process.pid)
        self._publish(replica)
        await self._follow(replica)

    async def _prepare(self, replica: _Replica, template: WorkerSpec, data: ReplicaData) -> WorkerSpec:
        """The replica's data in its directories (nothing of another host's), and the spec naming them."""
        assert self._registry is not None and self._cache is not None  # checked by _template
        directory = replica.directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / LOG_FILE).write_bytes(b"")
        self._note(replica, f"fetching data set {data.dataset_digest} from the registry")
        dataset = await self._cache.fetch(data.dataset_digest)
        checkpoint_dir, export_dir = directory / CHECKPOINT_DIR, directory / EXPORT_DIR
        await asyncio.to_thread(shutil.rmtree, checkpoint_dir, True)
        await asyncio.to_thread(shutil.rmtree, export_dir, True)
        if data.restore is not None:
            restore = data.restore
            self._note(replica, f"restoring checkpoint {restore.digest} (step {restore.step}) from the registry")
            retry = self._settings.registry_retry_seconds
            await restore_checkpoint(self._cache, self._registry, restore, checkpoint_dir / "backup" / "chief", retry)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        recipes_dir = None
        if template.recipe.startswith(FILE_PREFIX) and template.recipe_source:
            recipes_dir = directory / RECIPES_DIR
            target = _recipe_target(recipes_dir, template.recipe[len(FILE_PREFIX) :])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(template.recipe_source)
        replica.uploads = OutputUploads(
            str(replica.key),
            self._registry,
            self._cache,
            snapshots=checkpoint_dir / "snapshots",
            export_dir=export_dir,
            max_bytes=self._settings.max_upload_bytes,
            retry_seconds=self._settings.registry_retry_seconds,
            on_change=lambda: self._publish(replica),
        )
        self._note(replica, "starting the worker")
        return template.with_paths(
            str(dataset), str(checkpoint_dir), str(export_dir), str(recipes_dir) if recipes_dir else None
        )

    def _note(self, replica: _Replica, text: str) -> None:
        """A line of the agent's own in the replica's log (what it fetched, why it could not)."""
        try:
            replica.directory.mkdir(parents=True, exist_ok=True)
            with (replica.directory / LOG_FILE).open("a") as log:
                log.write(f"[agent] {text}\n")
        except OSError as exc:
            logger.warning("%s: cannot write its log: %s", replica.key, exc)

    def _exited(self, replica: _Replica, code: int) -> None:
        replica.state, replica.exit_code = ReplicaState.EXITED, code
        logger.info("%s exited with %d", replica.key, code)
        self._publish(replica)

    async def _spawn(
        self, directory: Path, tf_config: str, worker_spec: str, append_log: bool = False
    ) -> asyncio.subprocess.Process:
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
        with (directory / LOG_FILE).open("ab" if append_log else "wb") as log:
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
        """Publishes the progress lines as they appear (and hands announced outputs to the uploads), then the exit:
        noticed at once, published after the last lines and once the uploads of what the worker announced ended."""
        assert replica.process is not None
        process = replica.process
        tail = ProgressTail(replica.directory / PROGRESS_FILE)
        exit_code = asyncio.ensure_future(process.wait())
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
                    if replica.uploads is not None:
                        _announce(replica.uploads, line)
        finally:
            exit_code.cancel()
        _signal_group(process.pid, signal.SIGKILL)  # anything the worker left behind in its group
        logger.info("%s pid %d exited with %d", replica.key, process.pid, exit_code.result())
        if replica.uploads is not None:
            await replica.uploads.finish()
        replica.state, replica.exit_code = ReplicaState.EXITED, exit_code.result()
        self._publish(replica)

    def stop_replica(self, key: ReplicaKey, kill: bool) -> ReplicaStatus:
        """SIGTERM (a preemption: the worker saves and exits 42) or SIGKILL to the process group; returns at once.
        A replica still being prepared never starts; one whose process exited finishes its uploads."""
        replica = self._replicas.get(key)
        if replica is None:
            raise NotFound(f"no replica {key} on this agent")
        sig = signal.SIGKILL if kill else signal.SIGTERM
        if replica.state is ReplicaState.RUNNING and replica.process is None:
            logger.info("stopping %s before its worker started", key)
            replica.stop_signal = replica.stop_signal or sig
            replica.stopped.set()
        elif replica.state is ReplicaState.RUNNING and replica.process.returncode is None:
            logger.info("sending %s to %s pid %d", sig.name, key, replica.process.pid)
            _signal_group(replica.process.pid, sig)
        return self._status(replica)

    def list_replicas(self, job_id: str = "") -> list[ReplicaStatus]:
        """Running and exited replicas (of one job when given), ordered by job, attempt and task."""
        return [self._status(r) for r in self._matching(job_id)]

    def _matching(self, job_id: str) -> list[_Replica]:
        return [r for key, r in sorted(self._replicas.items()) if not job_id or key.job_id == job_id]

    def _status(self, replica: _Replica) -> ReplicaStatus:
        uploads = replica.uploads
        return ReplicaStatus(
            replica.key,
            replica.state,
            replica.pid,
            replica.exit_code,
            self._agent_id,
            checkpoint=uploads.checkpoint if uploads is not None else None,
            export=uploads.export if uploads is not None else None,
            error=replica.error or (uploads.error if uploads is not None else ""),
        )

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
        for replica in running:
            if replica.uploads is not None:
                replica.uploads.cancel()  # nothing more leaves this host: what is not uploaded is lost with it
            if replica.process is None:
                replica.stop_signal = signal.SIGTERM
                replica.stopped.set()
        followers = {r.follower for r in running if r.follower is not None}
        for replica in running:
            if replica.process is not None and replica.process.returncode is None:
                _signal_group(replica.process.pid, signal.SIGTERM)
        if followers:
            logger.info("stopping %d worker(s)", len(running))
            _, pending = await asyncio.wait(followers, timeout=grace)
            if pending:
                for replica in running:
                    process = replica.process
                    if replica.state is ReplicaState.RUNNING and process is not None and process.returncode is None:
                        logger.warning("%s pid %d ignored SIGTERM; killing it", replica.key, process.pid)
                        _signal_group(process.pid, signal.SIGKILL)
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


def _announce(uploads: OutputUploads, line: str) -> None:
    """Hands what a progress line announces (a checkpoint snapshot, the export) to the replica's uploads."""
    try:
        event = ProgressEvent.from_json(line)
    except ValueError:
        return  # not a trainer worker's line: relayed, nothing to upload
    match event:
        case CheckpointSaved():
            uploads.add_checkpoint(event.step, event.path)
        case Exported():
            uploads.add_export(event.path)


def _recipe_target(recipes_dir: Path, relative: str) -> Path:
    """Where a file recipe's source goes in `recipes_dir`; InvalidArgument unless it is a .py path inside it."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts or not relative.endswith(".py"):
        raise InvalidArgument(f"recipe: {relative!r} must be a relative path of a .py file, without '..'")
    return recipes_dir / relative


def _remove_outputs(directories: list[Path]) -> None:
    """The checkpoints and export of replicas whose job ended (their spec, log and shard records stay)."""
    for directory in directories:
        for path in (directory / CHECKPOINT_DIR / "backup", directory / CHECKPOINT_DIR / "snapshots"):
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(directory / EXPORT_DIR, ignore_errors=True)


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
