"""Prometheus metrics of the trainer: besides the RPC metrics (kit.metrics), gauges read at scrape time from what
it holds in memory (no Redis): its jobs by state, and the healthy agents with their total and free slots."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from services.kit.metrics import GaugeCollector, snapshot
from services.trainer.core import TrainerCore
from services.trainer.domain import JobState


def trainer_metrics(core: TrainerCore) -> CollectorRegistry:
    """The trainer's Prometheus registry with its job and slot gauges."""
    registry = CollectorRegistry()
    registry.register(GaugeCollector(lambda: trainer_gauges(core)))
    return registry


def trainer_gauges(core: TrainerCore) -> Iterator[tuple]:
    """One pass over the jobs the trainer follows (unfinished ones: finished jobs leave its memory) and agents."""
    states = snapshot(lambda: [job.state for job in list(core.jobs.values())])
    by_state = {state: 0 for state in JobState}
    for state in states:
        by_state[state] += 1
    yield (
        "modelgrid_trainer_jobs",
        "Jobs the trainer follows by state (finished jobs leave this count)",
        ("state",),
        [((state.value,), count) for state, count in by_state.items()],
    )
    workers = snapshot(core.workers)
    yield ("modelgrid_trainer_agents", "Healthy worker agents", (), [((), len(workers))])
    slots = [(("total",), sum(w.slots for w in workers)), (("free",), sum(max(w.slots - w.used, 0) for w in workers))]
    yield ("modelgrid_trainer_slots", "Worker slots on the healthy agents: total and free", ("kind",), slots)
