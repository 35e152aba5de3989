"""Trainer overhead and recovery: the same 2-worker training run bare and through the trainer, and kill -9 recovery.

What one run does (`make bench-trainer`: about 2 minutes on a quiet 2-core host, 4-5 under neighbours' load;
--quick about half that):

* warms the page cache with one untimed `import tensorflow, tf_keras`, so that no measured run pays for a cold
  disk alone;
* starts its own Consul dev agent, Redis server, registry, two worker agents (1 slot each) and the trainer on
  free loopback ports, everything in a temporary directory;
* --repeat times (default 2), in ABBA order so drift and neighbours hit both alike:
    bare     two `python -m services.trainer.worker --spec` processes launched by this script with a hand-built
             TF_CONFIG on free ports and the agents' worker environment; the spec is the one the trainer would
             send (services.trainer.specs.worker_spec of the same JobSpec) with each worker's own paths, as an
             agent sets them. Timed from the launch;
    trainer  SubmitJob of that JobSpec (digits MLP, --epochs, batch 32 per worker, seed 1, checkpoint every
             --checkpoint-every steps, report every 5, registered into the registry), followed to SUCCEEDED.
             Timed from just before the SubmitJob call;
* recovery, once: a longer job (step_delay_ms, report every step) is followed with GetJob; once it is RUNNING at
  step >= --kill-at-step, worker 1 (the process running that attempt's task-1 spec) gets SIGKILL; the job
  must restart from its checkpoint and succeed.

Where the numbers come from: job events (their server-side times), the workers' progress files ("time" of the
started/step/finished lines) and the first line each worker logs after importing TensorFlow ("joining the
group"); for the trainer runs these are read from the agents' work directories, and the exits from the agents'
own logs (everything runs on this host, so all clocks are one clock). "bare" and "through trainer" are medians
over the repeats; "runs" lists every run.

How to read it: the machine is small, shared and noisy: quote the ratios, not the seconds. "start -> first step"
and "start -> done" are the overhead a user sees; the rows under them split the trainer's time into scheduling,
worker start-up (the same work as bare), the relay of progress to the trainer, exit detection and registration.
"trainer's own steps" adds up the rows only the trainer has: it holds no worker work, so neighbours move it least.
The recovery row is a single sample: "kill -> restart detected" is the RESTART event (the exit is seen and the
rest of the group stopped), "kill -> first step after restore" the first STEP event of attempt 2; "recovery s"
is the trainer's own RESUMED.recovery_seconds (from the exit it saw, so it excludes detection); steps lost =
the last step the chief reached in attempt 1 - the step attempt 2 resumed at.
"""

import argparse
import datetime
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from harness import REPO_ROOT, Mesh, console, table, tmp_root_arg, work_dir
from rich.console import Console

from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc

# The trainer's internals this bench relies on: where the agents put a worker's files, the worker environment,
# and the worker spec the trainer derives from a JobSpec (which the bare runs get too).
from services.clients.agent import WorkerSpec
from services.kit.localinfra import free_ports
from services.trainer.agent.settings import DEFAULT_WORKER_ENV
from services.trainer.agent.supervisor import LOG_FILE, PROGRESS_FILE, PROGRESS_FILE_ENV, SPEC_FILE
from services.trainer.converters import spec_from_pb
from services.trainer.domain import Job
from services.trainer.settings import TrainerSettings
from services.trainer.specs import worker_spec

DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
IMPORTED_MARK = "joining the group"  # the first line a worker logs after importing TensorFlow (train.py)
RUN_TIMEOUT_S = 600.0
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
RESTART_BACKOFF_S = 1.0  # the trainer's default, stated so the report can name it


PATH_FIELDS = ("checkpoint_dir", "export_dir", "recipes_dir", "recipe_source")
"""What an agent sets in the trainer's worker spec (with the data set's path): its own directories."""


def expected_worker_spec(job_id: str, spec: pb.JobSpec, settings: TrainerSettings) -> WorkerSpec:
    """The worker spec the trainer sends for `spec` on its first attempt: no path (an agent sets its own)."""
    return worker_spec(Job(id=job_id, spec=spec_from_pb(spec), attempt=1), settings)


def without_paths(spec: dict) -> dict:
    """A worker spec's JSON object without what differs per host (the paths an agent sets)."""
    spec = {k: v for k, v in spec.items() if k not in PATH_FIELDS}
    return {**spec, "dataset": {k: v for k, v in spec["dataset"].items() if k != "paths"}}


@dataclass
class Stack:
    """The running services a trainer run needs."""

    stub: trainer_pb2_grpc.TrainerStub
    settings: TrainerSettings
    """The trainer's settings that shape worker specs (to check that bare runs get the same spec)."""
    agent_dirs: list[Path]
    agent_logs: list[Path]
    """The agents' own logs: they log each worker's exit as they see it."""


# ---- the job -------------------------------------------------------------------------------------------------


def job_spec(args: argparse.Namespace, **overrides) -> pb.JobSpec:
    """The digits MLP on two workers; bare runs get the worker spec the trainer derives from this."""
    spec = pb.JobSpec(
        name="bench-digits-mlp",
        recipe="mlp",
        dataset=pb.Dataset(local_path=str(DIGITS_NPZ), format="npz", features_key="x", label_key="y"),
        hyper_parameters=pb.HyperParameters(
            epochs=args.epochs, batch_size=32, learning_rate=0.01, optimizer="adam", validation_split=0.2, seed=1
        ),
        workers=2,
        checkpoint_every_steps=args.checkpoint_every,
        report_every_steps=5,
        max_restarts=2,
    )
    spec.recipe_params.update({"hidden_units": [64]})
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


# ---- reading what the workers wrote ----------------------------------------------------------------------------


def progress_lines(task_dir: Path) -> list[dict]:
    path = task_dir / PROGRESS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def logged_at(path: Path, *fragments: str) -> float | None:
    """Unix time of the first line of a text log (services.kit.logs: local time, ms) holding every fragment."""
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if all(fragment in line for fragment in fragments):
            return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def worker_timeline(task_dirs: list[Path]) -> dict[str, float]:
    """Group-level times from every task's log and progress file: the slowest worker for imported/started/finished,
    the chief (task-0) for the first step."""
    out: dict[str, float] = {}
    imported = [t for d in task_dirs if (t := logged_at(d / LOG_FILE, IMPORTED_MARK)) is not None]
    if len(imported) == len(task_dirs):
        out["imported"] = max(imported)
    lines = {d.name: progress_lines(d) for d in task_dirs}
    for kind in ("started", "finished"):
        times = [e["time"] for task in lines.values() for e in task if e["event"] == kind]
        if len(times) == len(task_dirs):
            out[kind] = max(times)
    steps = [e for e in lines.get("task-0", []) if e["event"] == "step"]
    if steps:
        out["first_step"] = steps[0]["time"]
        out["last_step"] = steps[-1]["step"]
    started = [e for e in lines.get("task-0", []) if e["event"] == "started"]
    if started:
        out["initial_step"] = started[0]["initial_step"]
    return out


# ---- bare run ----------------------------------------------------------------------------------------------------


def bare_run(workdir: Path, spec: pb.JobSpec, settings: TrainerSettings) -> dict[str, float]:
    """Launches the two workers directly and waits for both to exit; returns times relative to the launch."""
    run_id = f"bare-{uuid.uuid4().hex[:8]}"
    template = expected_worker_spec(run_id, spec, settings)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    task_dirs = [workdir / "bare" / run_id / f"task-{i}" for i in range(2)]
    processes: list[subprocess.Popen] = []
    for directory in task_dirs:  # each worker's own directories, as its agent gives them
        directory.mkdir(parents=True)
        local = template.with_paths(
            str(DIGITS_NPZ.resolve()), str(directory / "checkpoints"), str(directory / "export"), None
        )
        (directory / SPEC_FILE).write_text(local.to_json())
    launch = time.time()
    try:
        for index, directory in enumerate(task_dirs):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env = {**os.environ, **DEFAULT_WORKER_ENV, "TF_CONFIG": tf_config}
            env[PROGRESS_FILE_ENV] = str(directory / PROGRESS_FILE)
            argv = [sys.executable, "-m", "services.trainer.worker", "--spec", str(directory / SPEC_FILE)]
            with (directory / LOG_FILE).open("wb") as log:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO_ROOT,
                    start_new_session=True,
                )
            processes.append(process)
        codes = [p.wait(RUN_TIMEOUT_S) for p in processes]
        exited = time.time()
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if codes != [0, 0]:
        raise RuntimeError(f"bare workers exited with {codes}; log:\n{(task_dirs[1] / LOG_FILE).read_text()[-2000:]}")
    times = worker_timeline(task_dirs)
    worker_times = {k: times[k] - launch for k in ("imported", "started", "first_step", "finished")}
    return {"launched": 0.0, "exited": exited - launch, **worker_times}


# ---- trainer run -------------------------------------------------------------------------------------------------


def event_time(event: pb.JobEvent) -> float:
    return event.time.seconds + event.time.nanos / 1e9


def first_event(events: list[pb.JobEvent], kind: int, state: int = 0, attempt: int = 0) -> pb.JobEvent | None:
    for event in events:
        if event.type == kind and (not state or event.state == state) and (not attempt or event.attempt == attempt):
            return event
    return None


def attempt_dirs(stack: Stack, job_id: str, attempt: int) -> list[Path]:
    dirs = (d for agent in stack.agent_dirs for d in (agent / job_id / str(attempt)).glob("task-*"))
    return sorted(dirs, key=lambda d: d.name)


def follow(stack: Stack, job_id: str) -> tuple[pb.Job, list[pb.JobEvent]]:
    events = list(stack.stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=RUN_TIMEOUT_S))
    job = stack.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {pb.JobState.Name(job.state)}: {job.message} ({job.failure.reason})")
    return job, events


def exited_at(agent_log: Path, job_id: str) -> float:
    """When the agent saw the job's attempt-1 worker exit (supervisor: "<job>/1/task-<i> pid <pid> exited with")."""
    stamp = logged_at(agent_log, f"{job_id}/1/task-", " exited with ")
    if stamp is None:
        raise RuntimeError(f"{agent_log} does not show the exit of a worker of job {job_id}")
    return stamp


def trainer_run(stack: Stack, spec: pb.JobSpec) -> dict[str, float]:
    """Submits the job, follows it to SUCCEEDED; returns times relative to the submit."""
    submit = time.time()
    job = stack.stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=f"bench-{uuid.uuid4().hex}"), timeout=30)
    job, events = follow(stack, job.id)
    dirs = attempt_dirs(stack, job.id, 1)
    expected = without_paths(json.loads(expected_worker_spec(job.id, spec, stack.settings).to_json()))
    if without_paths(json.loads((dirs[0] / SPEC_FILE).read_text())) != expected:
        raise RuntimeError("the trainer sent a worker spec that differs from the one the bare runs get")
    times = worker_timeline(dirs)
    states = (pb.JOB_STATE_STARTING, pb.JOB_STATE_FINALIZING, pb.JOB_STATE_SUCCEEDED)
    state = {s: first_event(events, pb.JOB_EVENT_TYPE_STATE, s) for s in states}
    out = {
        "starting": event_time(state[pb.JOB_STATE_STARTING]),
        "launched": max((d / SPEC_FILE).stat().st_mtime for d in dirs),  # the agent writes it, then spawns
        "step_event": event_time(first_event(events, pb.JOB_EVENT_TYPE_STEP)),
        "exited": max(exited_at(log, job.id) for log in stack.agent_logs),
        "finalizing": event_time(state[pb.JOB_STATE_FINALIZING]),
        "succeeded": event_time(state[pb.JOB_STATE_SUCCEEDED]),
        **{k: times[k] for k in ("imported", "started", "first_step", "finished")},
    }
    times = {k: v - submit for k, v in out.items()}
    return {**times, "own": sum(span(times, interval) for interval in OWN)}


def measure_overhead(
    out: Console, stack: Stack, workdir: Path, spec: pb.JobSpec, repeat: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """`repeat` bare and trainer runs each, in ABBA order; the 1-min load average shows how busy the host was."""
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "trainer": []}
    started = time.monotonic()
    for index in range(repeat):
        for variant in ("bare", "trainer") if index % 2 == 0 else ("trainer", "bare"):
            load = os.getloadavg()[0]
            if variant == "bare":
                runs[variant].append(bare_run(workdir, spec, stack.settings))
            else:
                runs[variant].append(trainer_run(stack, spec))
            out.print(
                f"  run {index + 1} {variant}: {time.monotonic() - started:.0f}s in (1-min load average "
                f"{load:.1f} before, {os.getloadavg()[0]:.1f} after)"
            )
    return runs["bare"], runs["trainer"]


# ---- recovery ----------------------------------------------------------------------------------------------------


def worker_pid(job_id: str, attempt: int, task: int) -> int:
    """The pid of the worker process an agent started for this task (its --spec names the file)."""
    tail = f"/{job_id}/{attempt}/task-{task}/{SPEC_FILE}"
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if "--spec" in argv and argv[argv.index("--spec") + 1].endswith(tail):
            return int(entry.name)
    raise RuntimeError(f"no worker process runs ...{tail}")


def recovery_run(stack: Stack, spec: pb.JobSpec, kill_at_step: int) -> dict[str, float]:
    """Kills worker 1 with SIGKILL once the job is RUNNING at `kill_at_step`; times are relative to the kill."""
    job = stack.stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=f"bench-{uuid.uuid4().hex}"), timeout=30)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (job.state == pb.JOB_STATE_RUNNING and job.step >= kill_at_step):
        if job.state in FINAL or time.monotonic() > deadline:
            state, why = pb.JobState.Name(job.state), f"{job.message}; {job.failure.reason}"
            raise RuntimeError(f"job {job.id} never reached step {kill_at_step}: {state} ({why})")
        time.sleep(0.05)
        job = stack.stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
    pid = worker_pid(job.id, job.attempt, 1)
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    done, events = follow(stack, job.id)
    restart = first_event(events, pb.JOB_EVENT_TYPE_RESTART)
    resumed = first_event(events, pb.JOB_EVENT_TYPE_RESUMED)
    if restart is None or resumed is None or done.attempt != 2:
        raise RuntimeError(f"expected one restart, got attempt {done.attempt}: {[e.message for e in events]}")
    before, after = worker_timeline(attempt_dirs(stack, job.id, 1)), worker_timeline(attempt_dirs(stack, job.id, 2))
    return {
        "step_at_kill_poll": job.step,
        "detected": event_time(restart) - killed,
        "restarting": event_time(first_event(events, pb.JOB_EVENT_TYPE_STATE, pb.JOB_STATE_STARTING, 2)) - killed,
        "imported": after["imported"] - killed,
        "started": after["started"] - killed,
        "first_step_worker": after["first_step"] - killed,
        "first_step_event": event_time(first_event(events, pb.JOB_EVENT_TYPE_STEP, attempt=2)) - killed,
        "recovery_seconds": resumed.recovery_seconds,
        "restart_step": restart.step,
        "last_step": before["last_step"],
        "resume_step": resumed.step,
        "initial_step": after["initial_step"],
        "steps_lost": before["last_step"] - resumed.step,
        "total_steps": done.step,
    }


# ---- the services ------------------------------------------------------------------------------------------------


@contextmanager
def trainer_stack(workdir: Path) -> Iterator[Stack]:
    """Consul, Redis, registry, two 1-slot agents and the trainer for the duration of the block."""
    with Mesh(workdir, CONSUL_CHECK_INTERVAL="1s") as mesh:
        mesh.registry()
        agent_dirs = [workdir / "agents" / f"agent-{i}" for i in range(2)]
        for directory in agent_dirs:
            worker_logs = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "text"}
            mesh.start("agent", directory.name, SLOTS="1", WORK_DIR=str(directory), **worker_logs)
        (workdir / "recipes").mkdir()
        settings = TrainerSettings(scratch_dir=workdir / "scratch", recipes_dir=workdir / "recipes")
        trainer = mesh.start(
            "trainer",
            SCRATCH_DIR=str(settings.scratch_dir),
            RECIPES_DIR=str(settings.recipes_dir),
            RESTART_BACKOFF_SECONDS=str(RESTART_BACKOFF_S),
            DATASET_ROOTS=json.dumps([str(DIGITS_NPZ.parent)]),  # the job names the shipped data set by its path
        )
        with grpc.insecure_channel(trainer.target) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            deadline = time.monotonic() + 30
            while len(workers := stub.ListWorkers(pb.ListWorkersRequest(), timeout=10).workers) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the trainer sees {len(workers)} agents, expected 2")
                time.sleep(0.2)
            yield Stack(stub, settings, agent_dirs, [mesh.log(d.name) for d in agent_dirs])


def warm_up() -> None:
    env = {**os.environ, **DEFAULT_WORKER_ENV}
    argv = [sys.executable, "-c", "import tensorflow, tf_keras"]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---- report ------------------------------------------------------------------------------------------------------

# (row label, bare interval, trainer interval); an interval is (from, to) keys of the run's times, None: n/a.
ROWS = [
    ("start -> first step", ("launched", "first_step"), (None, "step_event")),
    ("start -> training done (all exits seen)", ("launched", "exited"), (None, "finalizing")),
    ("start -> SUCCEEDED (incl. registration)", ("launched", "exited"), (None, "succeeded")),
    ("  submit -> STARTING (scheduling)", None, (None, "starting")),
    ("  STARTING -> workers launched (StartReplica)", None, ("starting", "launched")),
    ("  launch -> TF imported (python, tf, tf_keras)", ("launched", "imported"), ("launched", "imported")),
    ("  TF imported -> started (join, data, model)", ("imported", "started"), ("imported", "started")),
    ("  started -> first step (in the worker)", ("started", "first_step"), ("started", "first_step")),
    ("  first step in worker -> STEP event (relay)", None, ("first_step", "step_event")),
    ("  first step -> finished (training, export)", ("first_step", "finished"), ("first_step", "finished")),
    ("  finished -> processes exited (TF teardown)", ("finished", "exited"), ("finished", "exited")),
    ("  exited -> FINALIZING (exit relay)", None, ("exited", "finalizing")),
    ("  FINALIZING -> SUCCEEDED (registration)", None, ("finalizing", "succeeded")),
    ("  trainer's own steps (the 5 trainer-only rows)", None, (None, "own")),
]
OWN = [
    (None, "starting"),
    ("starting", "launched"),
    ("first_step", "step_event"),
    ("exited", "finalizing"),
    ("finalizing", "succeeded"),
]
"""The trainer-only intervals: what the trainer adds beyond running the same workers."""


def span(run: dict[str, float], interval: tuple[str | None, str]) -> float:
    start, end = interval
    return run[end] - (run[start] if start else 0.0)


def seconds(value: float) -> str:
    """Two decimals below a second, one above, so that the runs column stays narrow."""
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"


def overhead_table(bare: list[dict[str, float]], trainer: list[dict[str, float]], title: str):
    result = table(title, ("metric", "bare s", "through trainer s", "ratio", "runs (bare | trainer)"))
    for label, bare_interval, trainer_interval in ROWS:
        bare_runs = [span(r, bare_interval) for r in bare] if bare_interval else []
        trainer_runs = [span(r, trainer_interval) for r in trainer]
        b, t = (statistics.median(bare_runs) if bare_runs else None), statistics.median(trainer_runs)
        ratio = f"{t / b:.2f}x" if b and b > 0.05 else "-"
        runs = " | ".join("/".join(seconds(v) for v in vs) or "-" for vs in (bare_runs, trainer_runs))
        result.add_row(label, "-" if b is None else f"{b:.2f}", f"{t:.2f}", ratio, runs)
    return result


def recovery_table(r: dict[str, float], checkpoint_every: int, title: str):
    columns = {
        "kill -> restart detected s": f"{r['detected']:.2f}",
        "kill -> first step after restore s": f"{r['first_step_event']:.2f}",
        "recovery s (RESUMED)": f"{r['recovery_seconds']:.2f}",
        "last step before kill": f"{r['last_step']:.0f}",
        "resume step": f"{r['resume_step']:.0f}",
        "steps lost": f"{r['steps_lost']:.0f}",
        "checkpoint interval": str(checkpoint_every),
    }
    result = table(title, list(columns), left=(), no_wrap=False)
    result.add_row(*columns.values())
    return result


def recovery_legend(out: Console, r: dict[str, float]) -> None:
    out.print(
        f"  after the kill (s): RESTART event {r['detected']:.2f} -> STARTING attempt 2 {r['restarting']:.2f} "
        f"(backoff {RESTART_BACKOFF_S:.1f}) -> TF imported {r['imported']:.2f} -> started {r['started']:.2f} -> "
        f"first step in worker {r['first_step_worker']:.2f} -> STEP event {r['first_step_event']:.2f}"
    )
    out.print(
        f"  killed when GetJob said step {r['step_at_kill_poll']:.0f}; the RESTART event says step "
        f"{r['restart_step']:.0f}; attempt 2 restored step {r['initial_step']:.0f}; {r['total_steps']:.0f} steps in all"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant (median reported)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the digits MLP (about 23 steps each)")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="checkpoint interval in steps")
    parser.add_argument("--kill-at-step", type=int, default=50, help="recovery: kill worker 1 at this step or later")
    parser.add_argument("--step-delay-ms", type=int, default=100, help="recovery: pause per step (a ~30 s job)")
    parser.add_argument("--quick", action="store_true", help="1 run each, 4 epochs (about 2 minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, progress files) for a look")
    tmp_root_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.epochs = 1, 4
    if args.epochs * 23 < args.kill_at_step + 2 * args.checkpoint_every:
        parser.error("the job is too short for --kill-at-step: raise --epochs")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = console(150)
    os.environ.update(MODELGRID_LOG_LEVEL="INFO", MODELGRID_LOG_FORMAT="text")  # workers: the lines timed here
    started = time.monotonic()
    with work_dir("modelgrid-bench-trainer-", args.tmp_root, keep=args.keep) as workdir:
        warm_up()
        spec = job_spec(args, register_model="bench-digits")
        with trainer_stack(workdir) as stack:
            out.print(f"work dir {workdir}; {os.cpu_count()} CPUs; {args.repeat} run(s) each, ABBA order")
            bare, trainer = measure_overhead(out, stack, workdir, spec, args.repeat)
            slow = job_spec(args, step_delay_ms=args.step_delay_ms, report_every_steps=1)
            recovery = recovery_run(stack, slow, args.kill_at_step)
        title = f"2-worker digits MLP, {args.epochs} epochs: bare vs through the trainer (medians of {args.repeat})"
        out.print(overhead_table(bare, trainer, title))
        out.print(
            "  start = launch of the worker processes (bare) / the SubmitJob call (trainer); ratio = trainer / bare\n"
            "  the first registration after the registry starts includes its lazy TensorFlow import (signatures)"
        )
        title = f"kill -9 of worker 1 at step >= {args.kill_at_step} (step_delay_ms {args.step_delay_ms}, one sample)"
        out.print(recovery_table(recovery, args.checkpoint_every, title))
        recovery_legend(out, recovery)
        out.print(f"total {time.monotonic() - started:.0f}s")
        if args.keep:
            out.print(f"kept {workdir}")


if __name__ == "__main__":
    main()
