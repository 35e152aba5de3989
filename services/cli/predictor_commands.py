"""The predictor commands: predict, bulk jobs (batch ...) and what a replica serves (serving ...).

They talk to one predictor replica (`--predictor`); `batch submit` and `batch fetch` also use the registry
(`--target`), which holds the data sets and the results of bulk jobs. Like the registry commands, each is a function
`(session, args) -> None` that raises grpc.RpcError, CommandError or OSError for `services.cli.main` to report.
"""

import argparse
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.modelref import ModelRef
from modelgrid.client.predictor import PredictorClient
from modelgrid.client.registry import convert
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from services.cli import arguments
from services.cli import predictor_views as views
from services.cli import tensor_files as files
from services.cli.arguments import command
from services.cli.registry_commands import CommandError
from services.cli.sessions import StubSession

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (".json", ".npy", ".npz")
OUTPUT_SUFFIXES = (".json", ".npz")
FINAL_JOB_STATES = (pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED, pb.BATCH_JOB_STATE_CANCELLED)
POLL_FIRST_S, POLL_MAX_S = 0.2, 2.0


class PredictorSession(StubSession):
    """The predictor stub next to the registry session."""

    stub_class = predictor_pb2_grpc.PredictorStub
    api_class = PredictorClient


Handler = Callable[[PredictorSession, argparse.Namespace], None]


def input_file(text: str) -> Path:
    """A .json, .npy or .npz file name."""
    if Path(text).suffix.lower() not in INPUT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a .json, .npy or .npz file")
    return Path(text)


def count(text: str) -> int:
    """A number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a number >= 0")
    return int(text)


def output_file(text: str) -> Path:
    """A .json or .npz file name."""
    if Path(text).suffix.lower() not in OUTPUT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a .json or .npz file")
    return Path(text)


# -- inputs and outputs --------------------------------------------------------------------------------------


def _signature_inputs(session: PredictorSession, name: str) -> list[common_pb2.TensorSpec]:
    """The inputs of the model's newest available version on the replica (NOT_FOUND if it does not serve it)."""
    status = session.api.metadata(name)
    if not status.inputs:
        reason = f": {status.reason}" if status.reason else ""
        raise CommandError(f"{name} has no available version to read its signature from{reason}")
    return list(status.inputs)


def _single_input(inputs: list[common_pb2.TensorSpec], name: str) -> common_pb2.TensorSpec:
    if len(inputs) != 1:
        names = ", ".join(spec.name for spec in inputs)
        raise CommandError(f"{name} takes {len(inputs)} inputs ({names}): give them by name in a .json or .npz file")
    return inputs[0]


def read_inputs(session: PredictorSession, ref: ModelRef, path: Path) -> dict[str, np.ndarray]:
    """Input arrays by name from a .npz (named arrays, sent as they are), a .npy (the single input, as it is) or
    a .json file ({"name": nested lists} or the single input's nested lists, cast to the signature's dtype)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return files.read_npz(path)
    if suffix == ".npy":
        array = files.read_npy(path)
        return {_single_input(_signature_inputs(session, ref.name), ref.name).name: array}
    value = files.read_json(path)
    inputs = _signature_inputs(session, ref.name)
    if not isinstance(value, dict):
        spec = _single_input(inputs, ref.name)
        return {spec.name: files.json_array(spec, value)}
    by_name = {spec.name: spec for spec in inputs}
    unknown = sorted(set(value) - set(by_name))
    if unknown:
        raise CommandError(f"{path}: {unknown} not in the signature of {ref.name} (inputs: {', '.join(by_name)})")
    return {name: files.json_array(by_name[name], item) for name, item in value.items()}


# -- predict -------------------------------------------------------------------------------------------------


def predict(session: PredictorSession, args: argparse.Namespace) -> None:
    ref: ModelRef = args.ref
    inputs = read_inputs(session, ref, args.input)
    answer = session.api.predict(ref, inputs, outputs=args.output_filter)
    names = args.output_filter or sorted(answer.outputs)
    outputs = {name: answer.outputs[name] for name in names}
    if args.output:
        files.write_outputs(args.output, answer.model, answer.version, outputs)
    out = session.out
    if out.json_mode:
        out.line(json.dumps(views.prediction_json(answer.model, answer.version, outputs)))
        if args.output:
            out.note(f"wrote the outputs to {args.output}")
        return
    out.line(f"answered by {answer.model}:{answer.version}")
    for name, array in outputs.items():
        out.line(views.output_heading(name, array))
        if views.output_fits_a_table(array):
            out.render(views.output_table(array))
        else:
            for line in views.output_lines(array):
                out.line(line)
    if args.output:
        out.line(f"wrote the outputs to {args.output}")


# -- bulk jobs -----------------------------------------------------------------------------------------------


def _get_job(session: PredictorSession, job_id: str) -> pb.BatchJob:
    return session.api.batch_job(job_id)


def _wait(session: PredictorSession, job: pb.BatchJob) -> pb.BatchJob:
    """Polls the job until it reaches a final state, showing its records on stderr."""
    delay = POLL_FIRST_S
    with views.job_progress(f"job {job.id}") as progress:
        while True:
            progress(job.done_records, job.total_records)
            if job.state in FINAL_JOB_STATES:
                return job
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)
            job = _get_job(session, job.id)


def batch_submit(session: PredictorSession, args: argparse.Namespace) -> None:
    path: Path = args.input
    if not files.read_npz(path, names_only=True):  # a bad file fails here, before the upload
        raise CommandError(f"{path}: the NPZ file holds no arrays")
    with session.out.transfer(f"upload {path.name}") as progress:
        blob = session.client.upload_blob(path)
        progress(blob.size_bytes, blob.size_bytes)
    spec = pb.BatchJobSpec(
        model=ref_to_pb(args.ref),
        input_digest=blob.digest,
        output_filter=args.output_filter,
        batch_size=args.batch_size,
    )
    job = session.call(session.stub.BatchPredict, iter([pb.BatchPredictRequest(spec=spec)]))
    if not args.wait:
        if session.out.json_mode:
            session.out.message(job)
        else:
            session.out.line(f"submitted job {job.id}")
        return
    session.out.note(f"submitted job {job.id}")
    job = _wait(session, job)
    if session.out.json_mode:
        session.out.message(job)
    if job.state != pb.BATCH_JOB_STATE_SUCCEEDED:
        state = views.job_state_name(job.state)
        raise CommandError(f"job {job.id} {state}" + (f": {job.error}" if job.error else ""))
    if not session.out.json_mode:
        session.out.line(f"job {job.id} succeeded: {job.done_records} records on {job.spec.model.name}:{job.version}")
        session.out.line(f"results {job.output_digest}")
        session.out.note(f"download them with: modelgrid batch fetch {job.id} RESULTS.npz")


def batch_status(session: PredictorSession, args: argparse.Namespace) -> None:
    job = _get_job(session, args.job_id)
    if session.out.json_mode:
        session.out.message(job)
    else:
        session.out.render(views.job_detail(job))


def batch_list(session: PredictorSession, args: argparse.Namespace) -> None:
    pages = session.registry.pages(session.stub.ListBatchJobs, pb.ListBatchJobsRequest(), "jobs")
    jobs = list(itertools.islice(pages, args.limit or None))
    if session.out.json_mode:
        session.out.message(pb.ListBatchJobsResponse(jobs=jobs))
    elif jobs:
        session.out.render(views.jobs_table(jobs))
    else:
        session.out.note("no jobs")


def batch_cancel(session: PredictorSession, args: argparse.Namespace) -> None:
    job = session.api.cancel_batch_job(args.job_id)
    if session.out.json_mode:
        session.out.message(job)
    else:
        session.out.line(f"job {job.id}: {views.job_state_name(job.state)}")


def batch_fetch(session: PredictorSession, args: argparse.Namespace) -> None:
    job = _get_job(session, args.job_id)
    if job.state != pb.BATCH_JOB_STATE_SUCCEEDED:
        error = f": {job.error}" if job.error else ""
        raise CommandError(f"job {job.id} is {views.job_state_name(job.state)}{error}; it has no results to fetch")
    dest: Path = args.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")  # an interrupted fetch resumes from it; dest is never half-written
    with session.out.transfer(f"fetch {job.id}") as progress:
        header = session.client.download_blob(job.output_digest, partial, progress=progress)
    os.replace(partial, dest)
    if session.out.json_mode:
        session.out.message(convert.download_to_pb(header))
        return
    session.out.line(f"fetched the results of job {job.id} into {dest}")
    session.out.line(f"digest {header.artifact.digest} verified ({header.artifact.size_bytes} bytes)")


# -- serving -------------------------------------------------------------------------------------------------


def serving_list(session: PredictorSession, args: argparse.Namespace) -> None:
    response = pb.ListModelsResponse(models=session.api.list_models())
    if session.out.json_mode:
        session.out.message(response)
    elif response.models:
        session.out.render(views.served_models_table(response.models))
    else:
        session.out.note("this replica serves no models")


def serving_show(session: PredictorSession, args: argparse.Namespace) -> None:
    _show_status(session, session.api.metadata(args.name))


def _policy(args: argparse.Namespace) -> pb.VersionPolicy:
    if args.latest:
        policy = pb.VersionPolicy(latest=args.latest)
    elif args.versions:
        policy = pb.VersionPolicy(specific=pb.Versions(versions=args.versions))
    elif args.aliases:
        policy = pb.VersionPolicy(aliases=pb.Aliases(aliases=args.aliases))
    else:
        policy = pb.VersionPolicy()
    policy.all_aliases = args.all_aliases
    return policy


def serving_load(session: PredictorSession, args: argparse.Namespace) -> None:
    request = pb.LoadModelRequest(name=args.name, policy=_policy(args), wait=not args.no_wait)
    status = session.call(session.stub.LoadModel, request)
    _show_status(session, status)
    available = any(v.state == pb.VERSION_STATE_AVAILABLE for v in status.versions)
    if request.wait and not available:
        reason = f": {status.reason}" if status.reason else ""
        raise CommandError(f"no version of {args.name} became available{reason}")


def serving_unload(session: PredictorSession, args: argparse.Namespace) -> None:
    response = session.call(session.stub.UnloadModel, pb.UnloadModelRequest(name=args.name))
    if session.out.json_mode:
        session.out.message(response)
    else:
        session.out.line(f"stopped serving {args.name}")


def _show_status(session: PredictorSession, status: pb.ModelStatus) -> None:
    if session.out.json_mode:
        session.out.message(status)
    else:
        session.out.render(views.served_model_detail(status))


# -- parsers -------------------------------------------------------------------------------------------------


_command = functools.partial(command, uses_predictor=True)


def _group(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(title="commands", metavar="COMMAND", required=True)


def _output_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-filter", nargs="+", action="extend", default=[], metavar="NAME", help="only these outputs"
    )


def _add_predict(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = _command(commands, "predict", predict, common, "run one prediction on a predictor replica")
    parser.add_argument("ref", type=arguments.model_ref, metavar="NAME[:V|@ALIAS]")
    parser.add_argument(
        "--input",
        type=input_file,
        required=True,
        metavar="FILE",
        help='.json ({"input": nested lists}, or the lists alone for a one-input model; cast to the signature\'s '
        "dtype), .npy (the one input) or .npz (arrays by input name); numpy files go as they are",
    )
    _output_filter(parser)
    parser.add_argument("--output", type=output_file, metavar="FILE", help="write all outputs to FILE.npz or .json")


def _add_batch(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    batch = _group(commands, "batch", "bulk prediction jobs over a data set")
    parser = _command(batch, "submit", batch_submit, common, "upload an NPZ data set to the registry and start a job")
    parser.add_argument("ref", type=arguments.model_ref, metavar="NAME[:V|@ALIAS]")
    parser.add_argument("--input", type=Path, required=True, metavar="FILE.npz", help="one array per input")
    parser.add_argument("--batch-size", type=count, default=0, metavar="N", help="records per model call")
    _output_filter(parser)
    parser.add_argument("--wait", action="store_true", help="follow the job to its end; exit 1 unless it succeeds")
    parser = _command(batch, "status", batch_status, common, "show one job with its progress")
    parser.add_argument("job_id", metavar="JOB_ID")
    parser = _command(batch, "list", batch_list, common, "list jobs, newest first")
    parser.add_argument("--limit", type=count, default=50, metavar="N", help="at most N jobs (0: all; default 50)")
    parser = _command(batch, "cancel", batch_cancel, common, "ask a running job to stop")
    parser.add_argument("job_id", metavar="JOB_ID")
    parser = _command(batch, "fetch", batch_fetch, common, "download a job's results from the registry")
    parser.add_argument("job_id", metavar="JOB_ID")
    parser.add_argument("path", type=Path, metavar="OUT.npz")


def _add_serving(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serving = _group(commands, "serving", "what a predictor replica serves")
    _command(serving, "list", serving_list, common, "models, versions and their states on the replica")
    parser = _command(serving, "show", serving_show, common, "one served model with its signature")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    parser = _command(serving, "load", serving_load, common, "serve a model (or change its version policy)")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--latest", type=arguments.version_number, metavar="N", help="N newest versions (default 1)")
    policy.add_argument("--versions", type=arguments.version_number, nargs="+", metavar="V", help="these versions")
    policy.add_argument("--aliases", type=arguments.alias_name, nargs="+", metavar="A", help="what these aliases name")
    parser.add_argument("--all-aliases", action="store_true", help="also every version an alias points at")
    parser.add_argument("--no-wait", action="store_true", help="answer at once instead of when the versions loaded")
    parser = _command(serving, "unload", serving_unload, common, "stop serving a model (in-flight requests finish)")
    parser.add_argument("name", type=arguments.model_name, metavar="NAME")


def add_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds the predictor commands to `commands`; `common` carries the global options each command repeats."""
    _add_predict(commands, common)
    _add_batch(commands, common)
    _add_serving(commands, common)
