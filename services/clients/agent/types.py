"""Worker processes as the agents report them: the types of the worker-agent API, shared by the agent (which runs
the processes), its client and the trainer's runner."""

from dataclasses import dataclass
from enum import Enum


class ReplicaState(Enum):
    """Lifecycle of a worker process."""

    RUNNING = "RUNNING"
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
class ReplicaStatus:
    """A replica as it was at one moment."""

    key: ReplicaKey
    state: ReplicaState
    pid: int
    exit_code: int
    """When EXITED: the process's exit status, negative for the signal that killed it."""
    agent: str


@dataclass(frozen=True)
class ReplicaEvent:
    """The replica after something happened: a progress line, or a change of state (no progress).

    The agent relays the worker's lines as they are (any JSON object: it runs whatever worker program it is
    configured with); the trainer reads them as `services.trainer.progress.ProgressEvent`.
    """

    replica: ReplicaStatus
    progress: str = ""
