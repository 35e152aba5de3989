"""Worker processes as the agents report them: the types of the worker-agent API, shared by the agent (which runs
the processes), its client and the trainer's runner."""

from dataclasses import dataclass
from enum import Enum


class ReplicaState(Enum):
    """Lifecycle of a worker process."""

    RUNNING = "RUNNING"
    """Being prepared (its data fetched: pid 0), running, or its outputs being uploaded after it exited."""
    EXITED = "EXITED"


@dataclass(frozen=True, order=True)
class ReplicaKey:
    """Which worker process: one task of one attempt of one job."""

    job_id: str
    attempt: int
    task_index: int

    def __str__(self) -> str:
        return f"{self.job_id}/{self.attempt}/task-{self.task_index}"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in the registry: a blob holding the deterministic tar of the chief's checkpoint files."""

    digest: str
    step: int
    """The global step it holds."""
    size_bytes: int = 0


@dataclass(frozen=True)
class Export:
    """A SavedModel in the registry: a blob holding its deterministic tar (the registry's SavedModel tar artifact),
    from which the trainer creates the model version."""

    digest: str
    size_bytes: int = 0


@dataclass(frozen=True)
class ReplicaData:
    """What a trainer job's replica works on, as registry blobs. Every byte that moves between hosts moves through
    the registry: the agent downloads these into its own directories before the worker starts (the worker spec names
    only those), and uploads the checkpoints and the SavedModel the worker announces."""

    dataset_digest: str
    """sha256 of the data set blob: downloaded once into the agent's content-addressed cache, verified."""
    restore: Checkpoint | None = None
    """The checkpoint the group resumes from (None: from the start), unpacked into the worker's checkpoint dir."""


@dataclass(frozen=True)
class ReplicaStatus:
    """A replica as it was at one moment."""

    key: ReplicaKey
    state: ReplicaState
    pid: int
    """0 while the agent fetches the replica's data (the process is not started yet)."""
    exit_code: int
    """When EXITED: the process's exit status, negative for the signal that killed it."""
    agent: str
    checkpoint: Checkpoint | None = None
    """The newest checkpoint of this replica the agent uploaded to the registry (a chief's)."""
    export: Export | None = None
    """The SavedModel of this replica the agent uploaded to the registry (a chief's)."""
    error: str = ""
    """What went wrong on the agent's side: fetching the replica's data or uploading its outputs ("": nothing)."""


@dataclass(frozen=True)
class ReplicaEvent:
    """The replica after something happened: a progress line, or a change of state or uploads (no progress).

    The agent relays the worker's lines as they are (any JSON object: it runs whatever worker program it is
    configured with); the trainer reads them as `services.trainer.progress.ProgressEvent`.
    """

    replica: ReplicaStatus
    progress: str = ""
