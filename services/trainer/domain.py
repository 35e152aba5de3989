"""Trainer domain types: jobs, their state machine, placements and events, stored in Redis as JSON."""

import dataclasses
import enum
import json
from dataclasses import dataclass, field

from modelgrid.client.errors import FailedPrecondition
from services.trainer.jobspec import JobSpec, spec_from_dict, spec_to_dict


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    SCHEDULING = "SCHEDULING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    FINALIZING = "FINALIZING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


FINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
"""States a job never leaves."""
HOLDS_SLOTS = {
    JobState.SCHEDULING,
    JobState.STARTING,
    JobState.RUNNING,
    JobState.RESTARTING,
    JobState.FINALIZING,
    JobState.CANCELLING,
}
"""States in which a job's placements occupy agent slots."""

TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.PENDING: {JobState.SCHEDULING, JobState.CANCELLED, JobState.FAILED},
    JobState.SCHEDULING: {JobState.STARTING, JobState.PENDING, JobState.CANCELLING, JobState.FAILED},
    JobState.STARTING: {
        JobState.RUNNING,
        JobState.RESTARTING,
        JobState.CANCELLING,
        JobState.FAILED,
        JobState.FINALIZING,
    },
    JobState.RUNNING: {JobState.FINALIZING, JobState.RESTARTING, JobState.CANCELLING, JobState.FAILED},
    JobState.RESTARTING: {
        JobState.STARTING,
        JobState.SCHEDULING,
        JobState.PENDING,
        JobState.FAILED,
        JobState.CANCELLING,
    },
    JobState.FINALIZING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING},
    JobState.CANCELLING: {JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}
"""The state machine: every allowed move. FINALIZING from STARTING covers a trainer restarted after the group
had already finished."""


class EventType(enum.StrEnum):
    STATE = "STATE"
    STEP = "STEP"
    EPOCH = "EPOCH"
    RESTART = "RESTART"
    RESUMED = "RESUMED"
    REGISTERED = "REGISTERED"


@dataclass
class Placement:
    """One replica: its task index, the agent running it and its collective endpoint."""

    task_index: int
    agent: str
    address: str


@dataclass
class Failure:
    """The first thing that went wrong in an attempt."""

    task_index: int = -1
    agent: str = ""
    exit_code: int = 0
    reason: str = ""


@dataclass(frozen=True)
class JobCheckpoint:
    """The newest checkpoint of a job in the registry (a blob: the tar of the chief's checkpoint files), which a
    restarted group resumes from on whichever hosts it lands."""

    digest: str
    step: int
    attempt: int
    """The attempt whose chief wrote it."""


@dataclass
class Job:
    """A training job."""

    id: str
    spec: JobSpec
    state: JobState = JobState.PENDING
    attempt: int = 0
    restarts: int = 0
    preemptions: int = 0
    placements: list[Placement] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    failure: Failure = field(default_factory=Failure)
    registered_version: int = 0
    request_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    dataset_digest: str = ""
    """sha256 of the data set blob in the registry: all the agents ever get of the data set."""
    recipe_digest: str = ""
    """sha256 of a registry recipe's source (`recipe: registry:<name>/<version>`), verified at submit."""
    message: str = ""
    cancel_requested: bool = False
    checkpoint: JobCheckpoint | None = None
    failed_at: float = 0.0
    """When the failure the job is recovering from happened (0: none): the next step is its RESUMED event, even
    after waiting PENDING for slots or a trainer restart in between."""

    @property
    def workers(self) -> int:
        return self.spec.workers

    def move(self, state: JobState) -> None:
        """Changes state along the state machine; FailedPrecondition for a move it does not allow."""
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise FailedPrecondition(f"job {self.id} cannot go from {self.state.value} to {state.value}")
        self.state = state

    def to_json(self) -> str:
        """The job as the store keeps it."""
        data = dataclasses.asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        data.pop("dataset_path", None)  # jobs stored before data sets travelled as blobs only
        data["spec"] = spec_from_dict(data["spec"])
        data["checkpoint"] = JobCheckpoint(**data["checkpoint"]) if data.get("checkpoint") else None
        data["state"] = JobState(data["state"])
        data["placements"] = [Placement(**p) for p in data["placements"]]
        data["failure"] = Failure(**data["failure"])
        return cls(**data)


@dataclass
class JobEvent:
    """Something that happened to a job, appended to its event stream."""

    type: EventType
    state: JobState
    attempt: int
    time: float
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    failure: Failure | None = None
    message: str = ""
    recovery_seconds: float = 0.0
    version: int = 0
    cursor: str = ""


@dataclass
class WorkerView:
    """A healthy agent with the slots jobs take on it."""

    id: str
    host: str
    address: str
    slots: int
    used: int = 0
    jobs: list[str] = field(default_factory=list)
