"""The trainer's worker agents: `AgentClient`, the replica types of their API and the `WorkerSpec` they run."""

from services.clients.agent.client import Agent, AgentClient
from services.clients.agent.types import (
    Checkpoint,
    Export,
    ReplicaData,
    ReplicaEvent,
    ReplicaKey,
    ReplicaState,
    ReplicaStatus,
)
from services.clients.agent.worker_spec import DatasetSpec, WorkerSpec

__all__ = [
    "Agent",
    "AgentClient",
    "Checkpoint",
    "DatasetSpec",
    "Export",
    "ReplicaData",
    "ReplicaEvent",
    "ReplicaKey",
    "ReplicaState",
    "ReplicaStatus",
    "WorkerSpec",
]
