"""Prometheus metrics of a worker agent: besides the RPC metrics (kit.metrics), gauges read at scrape time from
its supervisor: slots used and total, and worker processes running."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from services.clients.agent.types import ReplicaState
from services.kit.metrics import GaugeCollector, snapshot
from services.trainer.agent.supervisor import ReplicaSupervisor


def agent_metrics(supervisor: ReplicaSupervisor, slots: int) -> CollectorRegistry:
    """The agent's Prometheus registry with its slot and process gauges."""
    registry = CollectorRegistry()
    registry.register(GaugeCollector(lambda: agent_gauges(supervisor, slots)))
    return registry


def agent_gauges(supervisor: ReplicaSupervisor, slots: int) -> Iterator[tuple]:
    """One pass over the replicas the agent keeps (running and recently exited)."""
    replicas = snapshot(supervisor.list_replicas)
    running = [r for r in replicas if r.state is ReplicaState.RUNNING]
    yield (
        "modelgrid_agent_slots",
        "Worker slots of this agent: total and used",
        ("kind",),
        [(("total",), slots), (("used",), len(running))],
    )
    processes = sum(1 for r in running if r.pid)
    yield ("modelgrid_agent_worker_processes", "Worker processes running", (), [((), processes)])
