"""The trainer's contracts as pure logic: the JobSpec from and to protobuf and in the job store, the WorkerSpec a job
gives its replicas, progress events, exit codes, the job state machine and placement."""

import json
from pathlib import Path

import pytest

from modelgrid.client.errors import FailedPrecondition
from modelgrid.trainer.v1 import trainer_pb2 as pb
from services.clients.agent.types import Checkpoint, ReplicaData
from services.clients.agent.worker_spec import DatasetSpec, WorkerSpec
from services.trainer.converters import job_to_pb, spec_from_pb, spec_to_pb
from services.trainer.domain import Job, JobCheckpoint, JobState, Placement
from services.trainer.exit_codes import ExitCode, describe_exit
from services.trainer.jobspec import DEFAULT_HYPER_PARAMETERS, Dataset, HyperParameters, JobSpec, spec_from_dict
from services.trainer.placement import place
from services.trainer.progress import (
    CheckpointSaved,
    Epoch,
    Exported,
    Finished,
    Preempted,
    ProgressEvent,
    Shard,
    Started,
    Step,
)
from services.trainer.settings import TrainerSettings
from services.trainer.specs import replica_data, worker_spec


def full_pb() -> pb.JobSpec:
    spec = pb.JobSpec(
        name="digits",
        recipe="mlp",
        dataset=pb.Dataset(
            local_path="/data/d.csv",
            format="csv",
            feature_columns=["a", "b"],
            label_column="digit",
            num_classes=10,
        ),
        hyper_parameters=pb.HyperParameters(epochs=3, batch_size=16, learning_rate=0.01, seed=2**40),
        workers=2,
        checkpoint_every_steps=2**35,
        max_restarts=0,
        register_model="digits",
        register_aliases=["production", "latest"],
        report_every_steps=5,
        step_delay_ms=7,
        hang_timeout_seconds=12.5,
    )
    spec.recipe_params.update({"hidden_units": [64, 32], "dropout": 0.25})
    return spec


# -- JobSpec -------------------------------------------------------------------------------------------------------


def test_a_spec_converts_once_from_protobuf_and_back_unchanged():
    message = full_pb()
    spec = spec_from_pb(message)

    assert spec.dataset == Dataset(
        format="csv", local_path="/data/d.csv", feature_columns=("a", "b"), label_column="digit", num_classes=10
    )
    assert spec.hyper_parameters == HyperParameters(epochs=3, batch_size=16, learning_rate=0.01, seed=2**40)
    assert spec.checkpoint_every_steps == 2**35 and isinstance(spec.checkpoint_every_steps, int)
    assert spec.max_restarts == 0 and spec.register_aliases == ("production", "latest")
    assert spec.recipe_params["hidden_units"] == [64, 32] and spec.recipe_params["dropout"] == 0.25
    assert spec_to_pb(spec) == message


def test_unset_fields_stay_unset_and_take_defaults_where_used():
    message = pb.JobSpec(recipe="cnn", workers=1, dataset=pb.Dataset(blob_digest="ab" * 32, format="npz"))
    spec = spec_from_pb(message)

    assert spec.max_restarts is None, "an unset max_restarts means the trainer's default, not 0"
    assert spec.hyper_parameters == HyperParameters() and spec.recipe_params == {}
    assert spec.hyper_parameters.or_defaults() == DEFAULT_HYPER_PARAMETERS
    assert HyperParameters(epochs=5, optimizer="sgd").or_defaults() == HyperParameters(
        epochs=5, batch_size=32, learning_rate=1e-3, optimizer="sgd", validation_split=0.2, seed=0
    )
    back = spec_to_pb(spec)
    message.hyper_parameters.SetInParent()  # always present in a returned spec, as before JobSpec
    assert back == message and not back.HasField("max_restarts")
    assert back.dataset.WhichOneof("source") == "blob_digest"


def test_a_job_stores_its_spec_as_json_and_reads_the_old_protobuf_json_format():
    job = Job(id="j1", spec=spec_from_pb(full_pb()), placements=[Placement(0, "a", "h:1")], metrics={"loss": 0.5})
    assert Job.from_json(job.to_json()) == job
    job.checkpoint = JobCheckpoint("ab" * 32, 40, 2)
    assert Job.from_json(job.to_json()) == job
    assert job_to_pb(job).checkpoint == pb.JobCheckpoint(digest="ab" * 32, step=40, attempt=2)
    older = {**json.loads(job.to_json()), "dataset_path": "/shared/datasets/x.npz"}  # before data sets were blobs
    del older["checkpoint"]
    assert Job.from_json(json.dumps(older)) == Job(**{**vars(job), "checkpoint": None})

    # Jobs written before JobSpec: the protobuf JSON mapping (proto field names, unset fields left out).
    old = {
        "name": "x",
        "recipe": "mlp",
        "recipe_params": {"hidden_units": [64.0]},
        "workers": 2,
        "dataset": {"local_path": "/d.npz", "format": "npz", "features_key": "x"},
        "hyper_parameters": {"epochs": 8, "seed": 1},
        "checkpoint_every_steps": 5,
        "max_restarts": 2,
    }
    spec = spec_from_dict(old)
    assert spec.dataset == Dataset(format="npz", local_path="/d.npz", features_key="x")
    assert spec.hyper_parameters == HyperParameters(epochs=8, seed=1)
    assert (spec.workers, spec.max_restarts, spec.checkpoint_every_steps, spec.register_aliases) == (2, 2, 5, ())
    stored = json.loads(job.to_json())
    stored["spec"] = old
    assert Job.from_json(json.dumps(stored)).spec == spec


def test_the_job_as_returned_carries_the_spec_as_submitted():
    job = Job(id="j1", spec=spec_from_pb(full_pb()), state=JobState.RUNNING, created_at=1.5)
    message = job_to_pb(job)
    assert message.spec == full_pb()
    assert message.state == pb.JOB_STATE_RUNNING and message.created_at.ToNanoseconds() == 1_500_000_000


# -- WorkerSpec ----------------------------------------------------------------------------------------------------


def test_worker_spec_is_the_job_with_defaults_and_no_path_until_an_agent_sets_its_own(tmp_path: Path):
    settings = TrainerSettings(
        scratch_dir=tmp_path / "scratch", recipes_dir=tmp_path / "recipes", record_shard_ids=True
    )
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.py").write_text("def build_model(input_shape, num_classes):\n    pass\n")
    spec = JobSpec(
        recipe="file:mine.py",
        recipe_params={"hidden_units": [8]},
        dataset=Dataset(format="csv", local_path="/ignored.csv", label_column="digit", feature_columns=("a",)),
        hyper_parameters=HyperParameters(epochs=2, learning_rate=0.1),
        workers=2,
        step_delay_ms=3,
    )
    job = Job(id="job-1", spec=spec, attempt=3, dataset_digest="ab" * 32, checkpoint=JobCheckpoint("cd" * 32, 40, 2))

    template = worker_spec(job, settings)

    assert template == WorkerSpec(
        recipe="file:mine.py",
        recipe_params={"hidden_units": [8]},
        recipe_source="def build_model(input_shape, num_classes):\n    pass\n",
        dataset=DatasetSpec(format="csv", feature_columns=("a",), label_column="digit"),
        epochs=2,
        batch_size=32,
        learning_rate=0.1,
        optimizer="adam",
        validation_split=0.2,
        seed=0,
        checkpoint_every_steps=settings.default_checkpoint_every_steps,
        report_every_steps=settings.default_report_every_steps,
        step_delay_ms=3,
        record_shard_ids=True,
        attempt=3,
        snapshot_checkpoint_every=1,
    )
    assert "/ignored.csv" not in template.to_json() and str(tmp_path) not in template.to_json()
    assert replica_data(job) == ReplicaData(dataset_digest="ab" * 32, restore=Checkpoint("cd" * 32, 40))
    assert WorkerSpec.from_json(template.to_json(), template=True) == template  # what the agent reads
    with pytest.raises(ValueError, match="checkpoint_dir"):
        WorkerSpec.from_json(template.to_json())  # not runnable until an agent sets its paths
    for named in ({"checkpoint_dir": "/shared/x"}, {"dataset": {"format": "csv", "path": "/shared/d.csv"}}):
        with pytest.raises(ValueError, match="names no path"):
            WorkerSpec.from_dict({**json.loads(template.to_json()), **named}, template=True)

    worker = template.with_paths("/agent/cache/sha256/ab", "/agent/j/3/task-0/checkpoints", "/agent/x", "/agent/r")
    assert worker.dataset.paths == ("/agent/cache/sha256/ab",) and worker.recipe_source == ""
    assert (worker.checkpoint_dir, worker.export_dir, worker.recipes_dir) == (
        "/agent/j/3/task-0/checkpoints",
        "/agent/x",
        "/agent/r",
    )
    assert WorkerSpec.from_json(worker.to_json()) == worker  # what the agent writes is what the worker reads


# -- progress, exits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Shard(task=1, num_examples=700, example_ids_digest="ab", policy="DATA"),
        Started(task=0, workers=2, attempt=3, initial_step=40, steps_per_epoch=23, epochs=8),
        Step(step=45, epoch=2, metrics={"loss": 0.5, "accuracy": 0.75}),
        Epoch(epoch=2, metrics={"loss": 0.5, "val_accuracy": 0.9}),
        CheckpointSaved(step=40, path="/w/checkpoints/snapshots/step-40"),
        Preempted(task=1, step=None),
        Preempted(task=1, step=12),
        Exported(path="/x/export", metrics={"val_accuracy": 0.9, "steps": 46.0}),
        Finished(task=0, step=46),
    ],
)
def test_progress_events_round_trip_through_their_line(event: ProgressEvent):
    line = event.to_json()
    assert "\n" not in line and json.loads(line)["event"] == event.KIND
    assert ProgressEvent.from_json(line) == ProgressEvent.from_json(json.dumps(json.loads(line)))
    parsed = ProgressEvent.from_json(line)
    assert type(parsed) is type(event) and parsed == type(event)(**{**vars(event), "time": round(event.time, 3)})


def test_progress_lines_are_read_leniently_but_typed():
    started = ProgressEvent.from_json('{"event": "started", "task": 1, "workers": 2, "attempt": 1, "extra": "x"}')
    assert started == Started(time=started.time, task=1, workers=2, attempt=1)
    step = ProgressEvent.from_json('{"event": "step", "time": 5, "step": 7.0, "metrics": {"loss": 1, "note": "x"}}')
    assert step == Step(time=5.0, step=7, metrics={"loss": 1.0}) and isinstance(step.step, int)
    for bad in ('{"event": "teleported"}', '{"event": "step"}', '{"event": "step", "step": "7"}', "[1]", "{"):
        with pytest.raises(ValueError):
            ProgressEvent.from_json(bad)


def test_exit_codes_and_how_an_exit_is_described():
    assert (ExitCode.OK, ExitCode.INVALID_SPEC, ExitCode.PREEMPTED) == (0, 2, 42)
    assert describe_exit(3) == "code 3"
    assert describe_exit(-9) == "signal 9 (SIGKILL)"
    assert describe_exit(-99) == "signal 99"


# -- state machine, placement --------------------------------------------------------------------------------------


def test_the_state_machine_allows_only_its_moves():
    job = Job(id="j", spec=JobSpec(workers=1))
    for state in ("SCHEDULING", "STARTING", "RUNNING", "RESTARTING", "STARTING", "RUNNING", "FINALIZING"):
        job.move(JobState(state))
    job.move(JobState.FINALIZING)  # staying is no move
    with pytest.raises(FailedPrecondition, match="cannot go from FINALIZING to RUNNING"):
        job.move(JobState.RUNNING)
    job.move(JobState.SUCCEEDED)
    for state in JobState:
        if state != JobState.SUCCEEDED:
            with pytest.raises(FailedPrecondition):
                job.move(state)
    with pytest.raises(FailedPrecondition):
        Job(id="p", spec=JobSpec()).move(JobState.RUNNING)  # a pending job is placed first


@pytest.mark.parametrize(
    "workers, free, placed",
    [
        (2, {"a": 2, "b": 2}, ["a", "b"]),  # spread
        (3, {"a": 1, "b": 3}, ["b", "b", "a"]),  # the most free slots left first, ties by id
        (4, {"a": 2, "b": 2}, ["a", "b", "a", "b"]),
        (3, {"a": 1, "b": 1}, None),  # all or nothing
        (1, {"a": 0, "b": -1}, None),
        (1, {}, None),
    ],
)
def test_place_spreads_and_is_all_or_nothing(workers, free, placed):
    assert place(workers, free) == placed
