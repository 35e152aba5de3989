"""A SavedModel of more than 2 GiB pushed, pulled and loaded with bounded memory (streamed and chunked).

What one run does (`make bench-large`, about 2 minutes on 2 cores; --quick, a 300 MiB model, under a minute):

* builds, in a child process (TensorFlow never loads in this process, whose RSS is the client's), a SavedModel
  whose --variables float32 variables of shape [rows, 1024] hold --size-mib MiB together (default 2304 MiB =
  2.25 GiB, so the packed artifact is well past 2^31 bytes). Each variable is a random [256, 1024] block tiled
  (cheap to build, not all zeros); the serving signature y = x @ stack(mean(W_i, axis=0))^T (input "x"
  float32[-1, 1024], output "y" float32[-1, variables]) reads every byte of every variable, so the model really
  has to load, and its answer is known without TensorFlow (x @ the blocks' column means). A tiny model with the
  same signature is built next to it for the warm-up;
* starts its own Consul dev agent, Redis server, registry (MAX_ARTIFACT_BYTES raised when the default is too
  small for the artifact, for this registry only) and a predictor serving no model, on free loopback ports;
* warm-up: pushes and pulls the tiny model and has the predictor load and answer it, so that one-time costs
  (the predictor's TensorFlow runtime initialises on its first load) are in every baseline and not counted as
  growth caused by the large artifact;
* push: RegistryClient.push_savedmodel, phases: the client packs the directory into a tar on disk and hashes it;
  the transfer (a resumable UploadBlob in 1 MiB chunks; the registry hashes and writes as they come); the
  registry's commit (fsyncs and renames the blob; then CreateVersion from the blob reads the signature from the
  stored tar and records the version in Redis);
* pull: RegistryClient.download into a file, phases: the transfer; the client's sha256 of the whole file against
  the registry's digest (`download` removes the file and raises DataLoss on a mismatch); the digest and size are
  also compared with what the push returned;
* load: LoadModel(wait) on the predictor, phases (seen from its cache directory): download (the registry streams
  the artifact, the predictor writes it while hashing), unpack (tar to a directory), load + warm-up
  (tf.saved_model.load reads the variables, two synthetic requests); then one Predict, checked against numpy.

Memory: a thread samples VmRSS of this process ("client"), the registry and the predictor every 20 ms from
/proc/<pid>/status and attributes each sample to the phase running then (phase rows). Each operation also resets
the kernel's peak RSS of every process at its start (writing 5 to /proc/<pid>/clear_refs) and reads VmHWM at its
end, which also catches spikes between two samples (the "all" rows). Growth = peak - RSS at the start of the
operation; for the load it is measured from the predictor's baseline after the warm-up. The page cache the
2 GiB of file I/O fills is not in any process's RSS, so the numbers are what each process holds itself.

The bounds (the run exits 1 when one is broken; see BOUNDS for why each is what it is): the registry and the
client each grow by less than 128 MiB during the push and the pull, and the registry by less than 128 MiB while
it serves the predictor's download; the predictor by less than 128 MiB while it downloads and unpacks; the
predictor's peak while loading and answering stays below its baseline + 1.5x the artifact's size.
"""

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from harness import CHANNEL_OPTIONS, REPO_ROOT, Mesh, check_predict, console, fmt, table, tmp_root_arg, work_dir
from rich.console import Console

from modelgrid.client.registry import RegistryClient
from modelgrid.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from services.kit.localinfra import free_port
from services.registry.settings import RegistrySettings

MiB = 1024 * 1024
MB = 1_000_000
WIDTH = 1024  # columns of every variable: one row is 4 KiB of float32
BLOCK_ROWS = 256  # rows of the random block each variable tiles
MODEL = "large-bench"
WARMUP_MODEL = "large-bench-warmup"
SAMPLE_SECONDS = 0.02
LOAD_TIMEOUT = 1800.0  # seconds LoadModel may take for the whole download, unpack and load

# The bounds, in bytes or as a factor of the artifact's size. Measured on 2 cores (2.25 GiB model; 300 MiB with
# --quick): every streamed step grew its process by 35 MiB at most, whatever the size (client 9-17 MiB, registry
# 4-33 MiB, predictor download + unpack 14-17 MiB), and loading grew the predictor by 1.01x the artifact (1.06x for
# the small one, whose fixed costs weigh more). A fixed bound of about 4x the largest growth measured keeps a busy
# machine from failing the run, and is still below one whole copy of the --quick artifact, so either mode
# catches a transfer that reads the artifact into memory.
BOUNDS = {
    # The client sends 1 MiB chunks that gRPC's flow control paces, and receives the pull into a file: what it
    # holds is the channel's buffers and a chunk or two, independent of the artifact's size.
    "client_stream_bytes": 128 * MiB,
    # The registry hashes and writes each received chunk before it takes the next, and reads downloads chunk by
    # chunk from its blob file; it holds gRPC's buffers, a chunk or two, and the saved_model.pb it reads for the
    # signature (a few KiB here), none of it proportional to the artifact.
    "registry_stream_bytes": 128 * MiB,
    # The predictor writes the download into its cache while hashing, and unpacks file to file (tarfile streams).
    "predictor_fetch_bytes": 128 * MiB,
    # Loading holds the variables once (TensorFlow restores the checkpoint into the variables' buffers), plus
    # what the graph, TensorFlow's transient restore buffers and the serving path add (0.01-0.06x measured). A
    # second whole copy kept from the download, the unpack or the load would make it 2x or more; 1.5x sits in
    # between with room for the allocator's slack.
    "predictor_load_factor": 1.5,
}


# ---- memory of processes (Linux /proc) -----------------------------------------------------------------------


def memory_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (the peak since start or the last reset), RssAnon, RssFile of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(value.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> bool:
    """Resets the kernel's peak RSS (VmHWM) of a process to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PhaseStats:
    seconds: float = 0.0
    peak: dict[str, int] = field(default_factory=dict)
    """The largest VmRSS sampled per process during the phase."""


class MemoryWatch:
    """Samples the VmRSS of named processes every SAMPLE_SECONDS in a thread while the block runs, and attributes
    each sample (and the time since the previous one) to the phase `phase()` names. `before` holds each process's
    RSS at the start, `peak` its largest RSS over the block: the kernel's VmHWM (reset at the start) when it
    could be reset, else the largest sample."""

    def __init__(self, pids: dict[str, int], phase: Callable[[], str]) -> None:
        self.pids = pids
        self.phase = phase
        self.phases: dict[str, PhaseStats] = {}
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self.before = {name: memory_status(pid)["VmRSS"] for name, pid in self.pids.items()}
        self._exact = {name: reset_peak(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.before)
        self._started = self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.monotonic() - self._started
        for name, pid in self.pids.items():
            if self._exact[name]:
                self.peak[name] = max(self.peak[name], memory_status(pid)["VmHWM"])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        stats = self.phases.setdefault(self.phase(), PhaseStats())
        stats.seconds += now - self._last
        self._last = now
        for name, pid in self.pids.items():
            rss = memory_status(pid)["VmRSS"]
            stats.peak[name] = max(stats.peak.get(name, 0), rss)
            self.peak[name] = max(self.peak[name], rss)

    def growth(self, name: str, baseline: int | None = None) -> int:
        """Peak over the block minus `baseline` (default: the RSS at its start)."""
        return self.peak[name] - (self.before[name] if baseline is None else baseline)


class Phases:
    """The current phase of an operation, set by the bench's own callbacks."""

    def __init__(self, first: str) -> None:
        self.current = first

    def __call__(self) -> str:
        return self.current


# ---- the models (built in a child process: TensorFlow stays out of this one) ---------------------------------


def build_models(workdir: Path, size_mib: int, variables: int) -> None:
    """workdir/model (the large SavedModel), workdir/tiny, and workdir/{model,tiny}-means.npy (each variable's
    column means, which determine the answer) from a child process."""
    argv = [sys.executable, __file__, "--build", str(workdir), "--size-mib", str(size_mib)]
    argv += ["--variables", str(variables)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"building the models failed:\n{done.stderr[-3000:]}")


def _build_main(args: argparse.Namespace) -> None:
    import tensorflow as tf

    workdir = Path(args.build)
    rows = args.size_mib * MiB // (args.variables * WIDTH * 4)
    rows -= rows % BLOCK_ROWS
    _save_model(tf, workdir, "model", args.variables, rows, seed=1)
    _save_model(tf, workdir, "tiny", 2, BLOCK_ROWS, seed=2)


def _save_model(tf, workdir: Path, name: str, variables: int, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = [rng.random((BLOCK_ROWS, WIDTH), dtype=np.float32) for _ in range(variables)]
    np.save(workdir / f"{name}-means.npy", np.stack([b.astype(np.float64).mean(axis=0) for b in blocks]))

    class Large(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = [
                tf.Variable(tf.tile(tf.constant(block), [rows // BLOCK_ROWS, 1]), name=f"w{i}")
                for i, block in enumerate(blocks)
            ]

        @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32, name="x")])
        def serve(self, x):
            means = tf.stack([tf.reduce_mean(w, axis=0) for w in self.w])  # reads every byte of every variable
            return {"y": tf.matmul(x, means, transpose_b=True)}

    module = Large()
    tf.saved_model.save(module, str(workdir / name), signatures={"serving_default": module.serve})


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the operations ------------------------------------------------------------------------------------------


@dataclass
class Operation:
    """One measured operation: its watch, the artifact's size and the phases whose MB/s mean something."""

    name: str
    watch: MemoryWatch
    size: int
    streaming: tuple[str, ...]
    baseline: dict[str, int] = field(default_factory=dict)
    """RSS each process is measured from, when not the RSS at the start of the operation."""


def push(client: RegistryClient, pids: dict[str, int], directory: Path, name: str) -> tuple[Operation, object]:
    phases = Phases("pack + hash (client)")

    def progress(done: int, total: int) -> None:
        phases.current = "transfer" if done < total else "verify + commit (registry)"

    with MemoryWatch(pids, phases) as watch:
        version = client.push_savedmodel(name, directory, progress=progress)
    return Operation("push", watch, version.artifact.size_bytes, ("pack + hash (client)", "transfer")), version


def pull(client: RegistryClient, pids: dict[str, int], ref: str, dest: Path, expected) -> Operation:
    phases = Phases("transfer")

    def progress(done: int, total: int) -> None:
        phases.current = "transfer" if done < total else "sha256 of the file (client)"

    with MemoryWatch(pids, phases) as watch:
        downloaded = client.download(ref, dest, progress=progress)
    if (downloaded.artifact.digest, downloaded.artifact.size_bytes) != (expected.digest, expected.size_bytes):
        raise RuntimeError(f"pulled {downloaded.artifact}, pushed {expected}")
    if dest.stat().st_size != expected.size_bytes:
        raise RuntimeError(f"{dest} holds {dest.stat().st_size} bytes, the artifact {expected.size_bytes}")
    return Operation("pull", watch, expected.size_bytes, ("transfer", "sha256 of the file (client)"))


def load_model(target: str, name: str, timeout: float) -> None:
    """LoadModel(wait) of the latest version; raises unless it is AVAILABLE."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = predictor_pb2_grpc.PredictorStub(channel)
        status = stub.LoadModel(predictor_pb2.LoadModelRequest(name=name, wait=True), timeout=timeout)
    states = [(v.version, predictor_pb2.VersionState.Name(v.state), v.reason) for v in status.versions]
    if not states or any(state != "VERSION_STATE_AVAILABLE" for _, state, _ in states):
        raise RuntimeError(f"{name} did not load: {states} {status.reason}")


def load_and_predict(
    target: str, pids: dict[str, int], cache: Path, version, means: np.ndarray, baseline: int
) -> Operation:
    done = Phases("")

    def phase() -> str:
        if done.current:
            return done.current
        staging = next(cache.glob(".tmp-*"), None)
        if staging is not None:
            return "unpack" if (staging / "unpacked").exists() else "download"
        if (cache / version.artifact.digest).is_dir():
            return "load + warm-up (TensorFlow)"
        return "resolve"

    probe = np.random.default_rng(3).random((2, WIDTH), dtype=np.float32)
    with MemoryWatch(pids, phase) as watch:
        load_model(target, MODEL, LOAD_TIMEOUT)
        done.current = "one Predict"
        check_predict(target, MODEL, probe, probe.astype(np.float64) @ means.T, "the predictor")
    return Operation("load", watch, version.artifact.size_bytes, ("download", "unpack"), {"predictor": baseline})


# ---- report --------------------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / MiB:,.0f}"


def memory_cell(op: Operation, name: str, peak: int | None) -> str:
    if peak is None:
        return "-"
    base = op.baseline.get(name, op.watch.before[name])
    return f"{mib(peak)} ({'+' if peak >= base else '-'}{mib(abs(peak - base))})"


def print_table(out: Console, operations: list[Operation], names: list[str], variables_bytes: int) -> None:
    headers = ["operation", "phase", "MiB", "s", "MB/s", *(f"{n} RSS MiB (growth)" for n in names), "growth/size"]
    result = table("large artifact: time and peak RSS per process", headers, left=headers[:2])
    for op in operations:
        for phase, stats in op.watch.phases.items():
            rate = op.size / stats.seconds / MB if phase in op.streaming and stats.seconds > 0 else None
            cells = [memory_cell(op, n, stats.peak.get(n)) for n in names]
            result.add_row(op.name, phase, mib(op.size), f"{stats.seconds:.1f}", fmt(rate, ".0f"), *cells, "")
        growth = max(op.watch.growth(n, op.baseline.get(n)) for n in names)
        cells = [memory_cell(op, n, op.watch.peak[n]) for n in names]
        rate = op.size / op.watch.seconds / MB
        total = [f"[b]{op.name}[/b]", "[b]all (peak: VmHWM)[/b]", mib(op.size), f"{op.watch.seconds:.1f}"]
        result.add_row(*total, f"{rate:.0f}", *cells, f"{growth / op.size:.3f}")
    out.print(result)
    size = operations[-1].size
    out.print(
        f"  MiB = 2^20 bytes, MB/s = 10^6 bytes/s of the artifact ({size:,} bytes; variables {variables_bytes:,}); "
        "growth is from each process's RSS at the start of the operation (for the load, the predictor's baseline "
        "after the warm-up); growth/size is the largest growth of the three over the artifact's size",
        highlight=False,
    )


@dataclass
class Check:
    what: str
    measured: int
    bound: int
    size: int

    @property
    def ok(self) -> bool:
        return self.measured < self.bound


def checks(push_op: Operation, pull_op: Operation, load_op: Operation, baseline: int) -> list[Check]:
    fetch = max(s.peak["predictor"] for p, s in load_op.watch.phases.items() if p in ("resolve", "download", "unpack"))
    size = load_op.size
    client, registry = BOUNDS["client_stream_bytes"], BOUNDS["registry_stream_bytes"]
    return [
        Check("client RSS growth during the push", push_op.watch.growth("client"), client, size),
        Check("registry RSS growth during the push", push_op.watch.growth("registry"), registry, size),
        Check("client RSS growth during the pull", pull_op.watch.growth("client"), client, size),
        Check("registry RSS growth during the pull", pull_op.watch.growth("registry"), registry, size),
        Check("registry RSS growth serving the predictor", load_op.watch.growth("registry"), registry, size),
        Check("predictor RSS growth: download + unpack", fetch - baseline, BOUNDS["predictor_fetch_bytes"], size),
        Check(
            f"predictor RSS peak: load + predict (growth, bound {BOUNDS['predictor_load_factor']}x size)",
            load_op.watch.growth("predictor", baseline),
            int(BOUNDS["predictor_load_factor"] * size),
            size,
        ),
    ]


def print_checks(out: Console, results: list[Check]) -> None:
    result = table("bounds", ["check", "measured MiB", "bound MiB", "measured/size", "result"])
    for check in results:
        verdict = "[green]ok[/green]" if check.ok else "[red]BROKEN[/red]"
        ratio = f"{check.measured / check.size:.3f}"
        result.add_row(check.what, mib(check.measured), mib(check.bound), ratio, verdict)
    out.print(result)


# ---- the run -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2304, help="the variables' total size in MiB (2^20 bytes)")
    parser.add_argument("--variables", type=int, default=4, help="how many variables share that size")
    parser.add_argument("--quick", action="store_true", help="a 300 MiB model (about a minute)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) for a look; it holds GiBs")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # the child process that builds the models
    tmp_root_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib = 300
    if args.size_mib * MiB // (args.variables * WIDTH * 4) < BLOCK_ROWS:
        parser.error("--size-mib is too small for that many --variables")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, in the children
    args = parse_args(argv)
    if args.build:
        _build_main(args)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = console(170)
    started = time.monotonic()
    with work_dir("modelgrid-large-bench-", args.tmp_root, keep=args.keep) as workdir:
        # At the peak the disk holds the SavedModel, the client's tar and the registry's blob: ~3x the model.
        free = shutil.disk_usage(workdir).free
        if free < 3.2 * args.size_mib * MiB + 1024 * MiB:
            out.print(f"[red]{workdir} has {mib(free)} MiB free; this run needs about {3.2 * args.size_mib:,.0f}")
            return 2
        tempfile.tempdir = str(workdir)  # the client's temporary tar goes into the work dir too
        t0 = time.monotonic()
        build_models(workdir, args.size_mib, args.variables)
        model_dir = workdir / "model"
        variables_bytes = tree_size(model_dir / "variables")
        out.print(
            f"work dir {workdir}; {os.cpu_count()} CPUs; built the SavedModel in {time.monotonic() - t0:.0f} s: "
            f"{tree_size(model_dir):,} bytes, {args.variables} variables of {variables_bytes:,} bytes in all",
            highlight=False,
        )
        default_limit = RegistrySettings.model_fields["max_artifact_bytes"].default
        limit = max(default_limit, tree_size(model_dir) + 64 * MiB)  # raised for this registry only, when needed
        with Mesh(workdir, LOG_LEVEL="WARNING") as mesh:
            registry = mesh.registry(MAX_ARTIFACT_BYTES=str(limit))
            cache = workdir / "predictor-cache"
            predictor = mesh.start(
                "predictor",
                timeout=180,
                REGISTRY_TARGET=registry.target,
                CACHE_DIR=str(cache),
                METRICS_PORT=str(free_port()),
            )
            pids = {"client": os.getpid(), "registry": registry.process.pid, "predictor": predictor.process.pid}
            names = list(pids)
            start_rss = {name: memory_status(pid)["VmRSS"] for name, pid in pids.items()}
            with grpc.insecure_channel(registry.target, options=CHANNEL_OPTIONS) as channel:
                client = RegistryClient(channel, client_id="large-bench")
                # Warm-up: one-time costs of each process, so that they are in the baselines.
                client.ensure_model(WARMUP_MODEL, "large-artifact bench warm-up")
                tiny = client.push_savedmodel(WARMUP_MODEL, workdir / "tiny")
                client.download(f"{WARMUP_MODEL}:{tiny.version}", workdir / "tiny.tar")
                load_model(predictor.target, WARMUP_MODEL, 300)
                probe = np.ones((1, WIDTH), np.float32)
                tiny_means = np.load(workdir / "tiny-means.npy")
                check_predict(predictor.target, WARMUP_MODEL, probe, probe @ tiny_means.T, "the warm-up model")
                baseline = {name: memory_status(pid)["VmRSS"] for name, pid in pids.items()}

                client.ensure_model(MODEL, "large-artifact bench")
                push_op, version = push(client, pids, model_dir, MODEL)
                shutil.rmtree(model_dir)  # the disk space for what follows
                pulled = workdir / "pulled.tar"
                pull_op = pull(client, pids, f"{MODEL}:{version.version}", pulled, version.artifact)
                pulled.unlink()
                means = np.load(workdir / "model-means.npy")
                load_op = load_and_predict(predictor.target, pids, cache, version, means, baseline["predictor"])
        operations = [push_op, pull_op, load_op]
        out.print(
            "RSS MiB at start / after the warm-up: "
            + "; ".join(f"{n} {mib(start_rss[n])} / {mib(baseline[n])}" for n in names)
            + f". Registry MAX_ARTIFACT_BYTES {limit:,} (default {default_limit:,}). This process's peak RSS over "
            f"the whole run: {mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} MiB.",
            highlight=False,
        )
        print_table(out, operations, names, variables_bytes)
        results = checks(push_op, pull_op, load_op, baseline["predictor"])
        print_checks(out, results)
        out.print(
            f"  predictor peak growth / variables: "
            f"{load_op.watch.growth('predictor', baseline['predictor']) / variables_bytes:.2f}x; "
            f"whole run {time.monotonic() - started:.0f} s",
            highlight=False,
        )
    broken = [c.what for c in results if not c.ok]
    if broken:
        out.print(f"[red]bounds broken: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
