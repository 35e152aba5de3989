"""The trainer commands: jobs (submit, list, show, watch, cancel, logs) and workers.

They talk to the trainer (`--trainer`); `jobs submit` with `dataset.local_path` in its spec also uses the registry
(`--target`), whose blob store then holds the data set. Like the other commands, each is a function
`(session, args) -> None` that raises grpc.RpcError, CommandError, UsageError or OSError for `services.cli.main`.

A job spec is a YAML file whose keys are the JobSpec fields of protos/modelgrid/trainer/v1/trainer.proto (snake_case
or the JSON camelCase names); see examples/digits-mlp.yaml. One thing differs from the proto: `dataset.local_path`
(or its older name `upload`) is a file on *your* machine, relative to the YAML file's directory; the CLI uploads it
to the registry's blob store (resumably; nothing moves when the registry holds those bytes already) and sends its
digest as `blob_digest`. The trainer may run on another machine and reads no path of yours.
"""

import argparse
import difflib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from rich.console import Console
from rich.live import Live

from modelgrid.client.trainer import TrainerClient
from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.cli import trainer_views as views
from services.cli.arguments import command
from services.cli.registry_commands import CommandError, UsageError
from services.cli.sessions import StubSession

logger = logging.getLogger(__name__)

PAGE_SIZE = 100
RECONNECT_FOR_S = 60.0
"""How long `jobs watch` keeps reconnecting while the trainer is unavailable (e.g. restarting) before it gives up."""
LIVE_REFRESH_PER_S = 4
OPAQUE_MESSAGES = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")
"""Message fields whose content is free-form (recipe_params): not checked for unknown keys."""


class TrainerSession(StubSession):
    """The trainer stub next to the registry session."""

    stub_class = trainer_pb2_grpc.TrainerStub
    api_class = TrainerClient


Handler = Callable[[TrainerSession, argparse.Namespace], None]


def job_state(text: str) -> int:
    """A job state by name: "running", "RUNNING" or "JOB_STATE_RUNNING"."""
    name = "JOB_STATE_" + text.upper().removeprefix("JOB_STATE_")
    if name == "JOB_STATE_UNSPECIFIED" or name not in pb.JobState.keys():
        known = ", ".join(views.state_name(v) for v in pb.JobState.values() if v)
        raise argparse.ArgumentTypeError(f"invalid state {text!r}: expected one of {known}")
    return pb.JobState.Value(name)


def count(text: str) -> int:
    """A number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a number >= 0")
    return int(text)


# -- job specs -----------------------------------------------------------------------------------------------


def _check_fields(data: dict, descriptor: Descriptor, where: str) -> None:
    """UsageError naming the first key that is no field of the message (with the closest field name)."""
    fields = {**{f.json_name: f for f in descriptor.fields}, **{f.name: f for f in descriptor.fields}}
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            names = [f.name for f in descriptor.fields]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known fields: {', '.join(names)}"
            raise UsageError(f"unknown field {where}{key} ({hint})")
        message = field.message_type
        if (
            message is not None
            and isinstance(value, dict)
            and message.full_name not in OPAQUE_MESSAGES
            and not message.GetOptions().map_entry
        ):
            _check_fields(value, message, f"{where}{key}.")


def _beside(spec_file: Path, value: object, key: str) -> str:
    """A path from the spec, made absolute against the spec file's directory."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{spec_file}: dataset.{key} must be a non-empty path")
    return str((spec_file.parent / Path(value).expanduser()).resolve())


def load_spec(path: Path) -> tuple[pb.JobSpec, Path | None]:
    """The JobSpec of a YAML file, and the file to upload for `dataset.local_path` (None without it).

    Bad YAML, a key that is no JobSpec field or a value of the wrong type is a UsageError (exit code 2)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of JobSpec fields (name, recipe, dataset, ...)")
    upload = None
    if isinstance(data.get("dataset"), dict):
        dataset: dict[str, Any] = dict(data["dataset"])
        data = {**data, "dataset": dataset}
        sources = [k for k in ("upload", "local_path", "localPath", "blob_digest", "blobDigest") if k in dataset]
        if len(sources) > 1:
            raise UsageError(f"{path}: dataset has both {sources[0]} and {sources[1]}; give one")
        if sources and sources[0] in ("upload", "local_path", "localPath"):
            upload = Path(_beside(path, dataset.pop(sources[0]), sources[0]))
    _check_fields(data, pb.JobSpec.DESCRIPTOR, "")
    try:
        spec = json_format.ParseDict(data, pb.JobSpec())
    except json_format.ParseError as exc:
        raise UsageError(f"{path}: {str(exc).splitlines()[0]}") from None
    return spec, upload


# -- following a job -----------------------------------------------------------------------------------------


def _events(session: TrainerSession, job_id: str) -> Iterator[pb.JobEvent]:
    """The job's events from the first to its final state, reconnecting after the last one seen while the
    trainer is unavailable (a restarted trainer re-attaches to its jobs)."""
    cursor, failing_since = "", None
    while True:
        try:
            request = pb.WatchJobRequest(id=job_id, cursor=cursor)
            for event in session.stub.WatchJob(request, metadata=session.registry.metadata):
                cursor, failing_since = event.cursor, None
                yield event
                if event.type == pb.JOB_EVENT_TYPE_STATE and event.state in views.FINAL_STATES:
                    return
            logger.debug("the event stream of %s ended before its final state; reconnecting", job_id)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            logger.debug("watching %s: %s", job_id, err.details())
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > RECONNECT_FOR_S:
            raise CommandError(
                f"lost the trainer while watching job {job_id}; resume with: modelgrid jobs watch {job_id}"
            )
        time.sleep(1.0)


def _follow(session: TrainerSession, job: pb.Job) -> None:
    """Shows the job's events until its final state: a live display on a terminal, else one line per event
    (--json: one JobEvent object per line). Succeeds only when the job SUCCEEDED."""
    watch, out = views.JobWatch.of(job), session.out
    console = Console(highlight=False, markup=False)
    if out.json_mode or not console.is_terminal:
        for event in _events(session, job.id):
            watch.update(event)
            out.line(views.compact_json(event) if out.json_mode else views.event_line(event, watch))
    else:
        with Live(watch.renderable(), console=console, refresh_per_second=LIVE_REFRESH_PER_S) as live:
            for event in _events(session, job.id):
                watch.update(event)
                live.update(watch.renderable())
    final = _get_job(session, job.id)
    watch.state, watch.version, watch.metrics = final.state, final.registered_version, dict(final.metrics)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        cause = views.failure_text(final.failure) if final.state == pb.JOB_STATE_FAILED else ""
        raise CommandError(f"job {final.id} {views.state_name(final.state)}: {cause or final.message}")
    if not out.json_mode:
        out.line(watch.summary())


# -- commands ------------------------------------------------------------------------------------------------


def _get_job(session: TrainerSession, job_id: str) -> pb.Job:
    return session.api.job(job_id)


def jobs_submit(session: TrainerSession, args: argparse.Namespace) -> None:
    spec, upload = load_spec(args.spec)
    out = session.out
    if upload is not None:
        if not upload.is_file():
            raise CommandError(f"{args.spec}: dataset.local_path {upload} is not a file")
        with out.transfer(f"upload {upload.name}") as progress:
            blob = session.registry.client.upload_blob(upload, progress=progress)
        spec.dataset.blob_digest = blob.digest
    job = session.api.submit(spec, request_id=args.request_id)
    if out.json_mode and args.watch:  # then JobEvent lines follow: one JSON object per line
        out.line(views.compact_json(job))
    elif out.json_mode:
        out.message(job)
    else:
        out.line(job.id)
    if args.watch:
        _follow(session, job)
    elif not out.json_mode:
        out.note(f"follow it with: modelgrid jobs watch {job.id}")


def jobs_watch(session: TrainerSession, args: argparse.Namespace) -> None:
    _follow(session, _get_job(session, args.job_id))


def jobs_list(session: TrainerSession, args: argparse.Namespace) -> None:
    jobs: list[pb.Job] = []
    state, token = args.state or pb.JOB_STATE_UNSPECIFIED, ""
    while True:
        page_size = min(PAGE_SIZE, args.limit - len(jobs)) if args.limit else PAGE_SIZE
        response = session.api.jobs(state, page_size, token)
        jobs.extend(response.jobs)
        token = response.next_page_token
        if not token or (args.limit and len(jobs) >= args.limit):
            break
    jobs = jobs[: args.limit] if args.limit else jobs
    if session.out.json_mode:
        session.out.message(pb.ListJobsResponse(jobs=jobs))
    elif jobs:
        session.out.render(views.jobs_table(jobs))
    else:
        session.out.note("no jobs")


def jobs_show(session: TrainerSession, args: argparse.Namespace) -> None:
    job = _get_job(session, args.job_id)
    if session.out.json_mode:
        session.out.message(job)
    else:
        session.out.render(views.job_detail(job))


def jobs_cancel(session: TrainerSession, args: argparse.Namespace) -> None:
    job = session.api.cancel(args.job_id)
    if session.out.json_mode:
        session.out.message(job)
    else:
        session.out.line(f"job {job.id}: {views.state_name(job.state)}")


def jobs_logs(session: TrainerSession, args: argparse.Namespace) -> None:
    task = -1 if args.task is None else args.task
    response = pb.GetJobLogsResponse(logs=session.api.logs(args.job_id, task=task, tail_lines=args.tail))
    out = session.out
    if out.json_mode:
        out.message(response)
        return
    if not response.logs:
        out.note(f"job {args.job_id} has no workers yet")
    for index, log in enumerate(response.logs):
        if args.task is None:  # every worker: a header before each, as `tail` prints for several files
            if index:
                out.line("")
            out.line(f"==> task {log.task_index} on {log.agent} <==")
        for line in log.lines:
            out.line(line)


def workers(session: TrainerSession, args: argparse.Namespace) -> None:
    response = session.api.workers()
    if session.out.json_mode:
        session.out.message(response)
    elif response.workers:
        session.out.render(views.workers_table(response.workers))
    else:
        session.out.note("no healthy worker agents")


# -- parsers -------------------------------------------------------------------------------------------------


_command = functools.partial(command, uses_trainer=True)


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds the trainer commands to `commands`; `common` carries the global options each command repeats."""
    group = commands.add_parser("jobs", help="training jobs", description="training jobs on the worker agents")
    jobs = group.add_subparsers(title="commands", metavar="COMMAND", required=True)
    parser = _command(jobs, "submit", jobs_submit, common, "submit a training job from a YAML spec")
    parser.add_argument(
        "spec",
        type=Path,
        metavar="SPEC.yaml",
        help="JobSpec fields in YAML (see examples/digits-mlp.yaml); dataset.local_path, a file of yours "
        "(relative to this YAML file), is uploaded to the registry and sent as its blob_digest",
    )
    parser.add_argument("--watch", action="store_true", help="follow the job to its end; exit 1 unless it succeeds")
    parser.add_argument("--request-id", default="", metavar="ID", help="retrying with the same ID submits once")
    parser = _command(jobs, "list", jobs_list, common, "list jobs, newest first")
    parser.add_argument("--state", type=job_state, metavar="STATE", help="only jobs in STATE (e.g. RUNNING)")
    parser.add_argument("--limit", type=count, default=50, metavar="N", help="at most N jobs (0: all; default 50)")
    parser = _command(jobs, "show", jobs_show, common, "show one job: spec, placements, metrics, failure")
    parser.add_argument("job_id", metavar="JOB_ID")
    watch_help = "follow a job's events to its end; exit 1 unless it succeeds (Ctrl-C stops watching, not the job)"
    parser = _command(jobs, "watch", jobs_watch, common, watch_help)
    parser.add_argument("job_id", metavar="JOB_ID")
    parser = _command(jobs, "cancel", jobs_cancel, common, "stop a job and free its slots")
    parser.add_argument("job_id", metavar="JOB_ID")
    parser = _command(jobs, "logs", jobs_logs, common, "the last lines each worker process of a job wrote")
    parser.add_argument("job_id", metavar="JOB_ID")
    parser.add_argument("--task", type=count, metavar="N", help="only worker N (0 is the chief)")
    parser.add_argument("--tail", type=count, default=0, metavar="N", help="lines from the end (default 200)")
    _command(commands, "workers", workers, common, "worker agents with their slots and jobs")
