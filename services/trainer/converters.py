"""Conversions between trainer protobuf messages and domain types."""

from typing import Any

from google.protobuf import json_format

from modelgrid.trainer.v1 import trainer_pb2 as pb
from services.registry.converters import timestamp
from services.trainer.domain import Failure, Job, JobEvent, JobState


def spec_from_pb(spec: pb.JobSpec) -> dict[str, Any]:
    """The spec as plain JSON-ready data (int64 fields as ints, not the JSON mapping's strings)."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    if "checkpoint_every_steps" in data:
        data["checkpoint_every_steps"] = int(data["checkpoint_every_steps"])
    hp = data.setdefault("hyper_parameters", {})
    if "seed" in hp:
        hp["seed"] = int(hp["seed"])
    data.setdefault("dataset", {})
    return data


def spec_to_pb(spec: dict[str, Any]) -> pb.JobSpec:
    return json_format.ParseDict(spec, pb.JobSpec())


def state_from_pb(value: int) -> JobState | None:
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    return JobState(pb.JobState.Name(value).removeprefix("JOB_STATE_"))


def state_to_pb(state: JobState) -> int:
    return pb.JobState.Value(f"JOB_STATE_{state.value}")


def failure_to_pb(failure: Failure | None) -> pb.Failure | None:
    if failure is None:
        return None
    return pb.Failure(
        task_index=failure.task_index, agent=failure.agent, exit_code=failure.exit_code, reason=failure.reason
    )


def job_to_pb(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id,
        spec=spec_to_pb(job.spec),
        state=state_to_pb(job.state),
        attempt=job.attempt,
        restarts=job.restarts,
        preemptions=job.preemptions,
        placements=[pb.Placement(task_index=p.task_index, agent=p.agent, address=p.address) for p in job.placements],
        epoch=job.epoch,
        step=job.step,
        metrics=job.metrics,
        failure=failure_to_pb(job.failure),
        registered_version=job.registered_version,
        request_id=job.request_id,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        dataset_digest=job.dataset_digest,
        message=job.message,
    )


def event_to_pb(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        cursor=event.cursor,
        type=pb.JobEventType.Value(f"JOB_EVENT_TYPE_{event.type.value}"),
        time=timestamp(event.time),
        state=state_to_pb(event.state),
        attempt=event.attempt,
        epoch=event.epoch,
        step=event.step,
        metrics=event.metrics,
        failure=failure_to_pb(event.failure),
        message=event.message,
        recovery_seconds=event.recovery_seconds,
        version=event.version,
    )
