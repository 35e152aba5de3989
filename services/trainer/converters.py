"""Conversions between trainer protobuf messages and domain types: the only place the servicer's protobuf meets
the core's dataclasses."""

from google.protobuf import json_format

from modelgrid.client.convert import enum_member, timestamp
from modelgrid.client.errors import InvalidArgument
from modelgrid.trainer.v1 import trainer_pb2 as pb
from services.trainer.domain import Failure, Job, JobCheckpoint, JobEvent, JobState, WorkerView
from services.trainer.jobspec import Dataset, HyperParameters, JobSpec


def _recipe_params(params) -> dict:
    """A Struct as JSON-ready data; InvalidArgument for values JSON cannot hold (NaN, infinity)."""
    try:
        return json_format.MessageToDict(params)
    except ValueError:
        raise InvalidArgument("recipe_params must hold finite numbers only") from None


def spec_from_pb(spec: pb.JobSpec) -> JobSpec:
    """The submitted spec; unset fields stay unset (zero, or None for max_restarts)."""
    dataset, hp = spec.dataset, spec.hyper_parameters
    return JobSpec(
        name=spec.name,
        recipe=spec.recipe,
        recipe_params=_recipe_params(spec.recipe_params),
        dataset=Dataset(
            format=dataset.format,
            blob_digest=dataset.blob_digest,
            local_path=dataset.local_path,
            feature_columns=tuple(dataset.feature_columns),
            label_column=dataset.label_column,
            features_key=dataset.features_key,
            label_key=dataset.label_key,
            num_classes=dataset.num_classes,
        ),
        hyper_parameters=HyperParameters(
            epochs=hp.epochs,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            optimizer=hp.optimizer,
            validation_split=hp.validation_split,
            seed=hp.seed,
        ),
        workers=spec.workers,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        max_restarts=spec.max_restarts if spec.HasField("max_restarts") else None,
        register_model=spec.register_model,
        register_aliases=tuple(spec.register_aliases),
        report_every_steps=spec.report_every_steps,
        step_delay_ms=spec.step_delay_ms,
        hang_timeout_seconds=spec.hang_timeout_seconds,
    )


def spec_to_pb(spec: JobSpec) -> pb.JobSpec:
    dataset, hp = spec.dataset, spec.hyper_parameters
    message = pb.JobSpec(
        name=spec.name,
        recipe=spec.recipe,
        dataset=pb.Dataset(
            format=dataset.format,
            feature_columns=dataset.feature_columns,
            label_column=dataset.label_column,
            features_key=dataset.features_key,
            label_key=dataset.label_key,
            num_classes=dataset.num_classes,
        ),
        hyper_parameters=pb.HyperParameters(
            epochs=hp.epochs,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            optimizer=hp.optimizer,
            validation_split=hp.validation_split,
            seed=hp.seed,
        ),
        workers=spec.workers,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        register_model=spec.register_model,
        register_aliases=spec.register_aliases,
        report_every_steps=spec.report_every_steps,
        step_delay_ms=spec.step_delay_ms,
        hang_timeout_seconds=spec.hang_timeout_seconds,
    )
    if dataset.blob_digest:
        message.dataset.blob_digest = dataset.blob_digest
    elif dataset.local_path:
        message.dataset.local_path = dataset.local_path
    if spec.recipe_params:
        message.recipe_params.update(spec.recipe_params)
    if spec.max_restarts is not None:
        message.max_restarts = spec.max_restarts
    return message


def state_from_pb(value: int) -> JobState | None:
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    return JobState(enum_member(pb.JobState, value, "job state").removeprefix("JOB_STATE_"))


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
        checkpoint=checkpoint_to_pb(job.checkpoint),
    )


def checkpoint_to_pb(checkpoint: JobCheckpoint | None) -> pb.JobCheckpoint | None:
    if checkpoint is None:
        return None
    return pb.JobCheckpoint(digest=checkpoint.digest, step=checkpoint.step, attempt=checkpoint.attempt)


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


def worker_to_pb(worker: WorkerView) -> pb.Worker:
    return pb.Worker(
        id=worker.id,
        host=worker.host,
        address=worker.address,
        slots=worker.slots,
        used_slots=worker.used,
        jobs=worker.jobs,
    )
