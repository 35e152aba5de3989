"""What every benchmark here shares: a work dir, the mesh's processes, a load generator, CPU accounting, tables.

A bench script imports it as a sibling module (`python bench/x_bench.py` puts bench/ on sys.path)::

    with work_dir("modelgrid-x-bench-", args.tmp_root) as workdir, Mesh(workdir, LOG_LEVEL="WARNING") as mesh:
        registry = mesh.registry()
        predictor = mesh.start("predictor", REGISTRY_TARGET=registry.target, MODELS=...)
        result = run_load(Load(predictor.target, payloads, concurrency=8, warmup=1, duration=3,
                               pids={"srv": predictor.process.pid}), workdir)

The load generator runs in a child process (`python bench/harness.py --loadgen SPEC`), so that it has an event
loop of its own and its CPU time can be told apart from the bench's. Only ratios measured in one run mean
anything: the machines are small and shared.
"""

import argparse
import asyncio
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from modelgrid.client.registry import RegistryClient
from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2
from services.kit.localinfra import ConsulAgent, RedisServer
from services.kit.processes import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]  # loopback only: never through a proxy from the environment
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PREDICT_METHOD = "/modelgrid.predictor.v1.Predictor/Predict"
SERVICES = {  # kind -> (module, settings prefix, Consul service name: its ACL token's)
    "registry": ("services.registry", "MODELGRID_REGISTRY_", "registry"),
    "predictor": ("services.predictor", "MODELGRID_PREDICTOR_", "predictor"),
    "gateway": ("services.gateway", "MODELGRID_GATEWAY_", "gateway"),
    "trainer": ("services.trainer", "MODELGRID_TRAINER_", "trainer"),
    "agent": ("services.trainer.agent", "MODELGRID_AGENT_", "trainer-agent"),
}


# ---- the run -------------------------------------------------------------------------------------------------


def console(width: int) -> Console:
    """A rich console; piped into a log it is `width` columns wide (rich would otherwise squeeze to 80)."""
    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, width)
    return out


@contextmanager
def work_dir(prefix: str, root: Path, *, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary directory under `root`, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def tmp_root_arg(parser: argparse.ArgumentParser) -> None:
    default = Path(tempfile.gettempdir())
    parser.add_argument("--tmp-root", type=Path, default=default, help="where the temporary work dir goes")


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---- the mesh ------------------------------------------------------------------------------------------------


class Mesh:
    """Consul, Redis and service processes on free loopback ports for the duration of the block, stopped in the
    reverse order of their start. `common` settings (without prefix) go to every service with the addresses of
    Consul and Redis; each service logs to <workdir>/logs/<name>.log."""

    def __init__(self, workdir: Path, **common: str) -> None:
        self.workdir = workdir
        self.common = common
        self._stack = ExitStack()

    def __enter__(self) -> "Mesh":
        try:
            self.consul = self._stack.enter_context(ConsulAgent(self.workdir / "consul"))
            self.redis = self._stack.enter_context(RedisServer(self.workdir / "redis"))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.__exit__(*exc_info)

    @property
    def env(self) -> dict[str, str]:
        return {"CONSUL_URL": self.consul.http_url, "REDIS_URL": self.redis.url, **self.common}

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def start(self, kind: str, name: str = "", *, timeout: float = 60.0, **settings: str) -> ServiceProcess:
        """The service `kind` (see SERVICES) with the mesh's settings and these, once it is SERVING."""
        module, prefix, consul_name = SERVICES[kind]
        token = {"CONSUL_TOKEN": self.consul.token_for(consul_name)}  # Consul has ACLs on: a token per service
        service = ServiceProcess(module, prefix, {**self.env, **token, **settings}, self.log(name or kind))
        self._stack.callback(service.stop)
        return service.start(timeout=timeout)

    def registry(self, **settings: str) -> ServiceProcess:
        return self.start("registry", BLOB_DIR=str(self.workdir / "blobs"), **settings)

    def process(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[], bool],
        timeout: float = 120.0,
        *,
        env: dict[str, str] | None = None,
        tree: bool = False,
    ) -> int:
        """Any other server process (cwd: the repo), once `ready()` says it answers; returns its pid. `env` is added
        to this process's environment; `tree`: at the end, the processes it started are ended too (a server with
        worker processes)."""
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        environment = None if env is None else {**os.environ, **env}
        with self.log(name).open("ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environment)
        self._stack.callback(_terminate_tree if tree else _terminate, process)
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; log:\n{self.log(name).read_text()[-3000:]}")
            time.sleep(0.2)
        return process.pid


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants, parents first (Linux /proc; just [pid] elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, []))
    return tree


def _start_time(pid: int) -> str | None:
    """When a live process started (clock ticks since boot); None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def _terminate_tree(process: subprocess.Popen) -> None:
    """Ends the process as _terminate does, then whichever of its descendants outlived it (SIGTERM, then SIGKILL);
    each is recognised by its pid and start time, so a reused pid is left alone."""
    descendants = [(pid, _start_time(pid)) for pid in process_tree(process.pid)[1:]]
    _terminate(process)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [(pid, start) for pid, start in descendants if start is not None and _start_time(pid) == start]
        for pid, _ in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [(pid, start) for pid, start in alive if _start_time(pid) == start]
        if not alive:
            return


def http_ok(url: str) -> bool:
    try:
        NO_PROXY.open(url, timeout=2).read()
        return True
    except OSError:
        return False


def push_models(registry_target: str, models: dict[str, tuple[Path, str]], client_id: str) -> None:
    """Pushes each SavedModel directory as a new version of its model (name -> (directory, description))."""
    with grpc.insecure_channel(registry_target, options=CHANNEL_OPTIONS) as channel:
        client = RegistryClient(channel, client_id=client_id)
        for name, (directory, description) in models.items():
            client.ensure_model(name, description)
            client.push_savedmodel(name, directory)


# ---- the model and its requests ------------------------------------------------------------------------------


def build_mlp(directory: Path, dims: Sequence[int] = (64, 256, 256, 10)) -> None:
    """Dense layers of these widths with ReLU between them (64 -> 256 -> 256 -> 10 unless told); input "x"
    float32[-1, dims[0]], output "y"."""
    import tensorflow as tf

    rng = np.random.default_rng(1)

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            pairs = list(zip(dims, dims[1:], strict=False))
            self.w = [tf.Variable(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype("float32")) for a, b in pairs]
            self.b = [tf.Variable(np.zeros(b, "float32")) for b in dims[1:]]

        @tf.function(input_signature=[tf.TensorSpec([None, dims[0]], tf.float32, name="x")])
        def serve(self, x):
            for i, (w, b) in enumerate(zip(self.w, self.b, strict=True)):
                x = tf.matmul(x, w) + b
                x = tf.nn.relu(x) if i < len(self.w) - 1 else x
            return {"y": x}

    module = MLP()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})


def build_cnn(directory: Path, widths: Sequence[int], pool_after: Sequence[int]) -> None:
    """3x3 convolutions of these widths with ReLU (a 2x2 max-pool after the layers in `pool_after`), global average
    pool, dense to 10; input "x" float32[-1, 32, 32, 3], output "y"."""
    import tensorflow as tf

    rng = np.random.default_rng(2)

    class CNN(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            ins = (3, *widths[:-1])
            self.kernels = [
                tf.Variable(rng.normal(0, (2 / (9 * a)) ** 0.5, (3, 3, a, b)).astype("float32"))
                for a, b in zip(ins, widths, strict=True)
            ]
            self.dense = tf.Variable(rng.normal(0, 0.05, (widths[-1], 10)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="x")])
        def serve(self, x):
            for i, kernel in enumerate(self.kernels):
                x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
                x = tf.nn.max_pool2d(x, 2, 2, "VALID") if i in pool_after else x
            return {"y": tf.matmul(tf.reduce_mean(x, axis=[1, 2]), self.dense)}

    module = CNN()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})


def build_mlp_in_child(directory: Path, probe: np.ndarray) -> np.ndarray:
    """Builds the MLP into `directory` in a child process and returns its answer to `probe`: TensorFlow never
    loads in the calling process, which stays small."""
    directory.mkdir()
    np.save(directory.parent / "probe.npy", probe)
    argv = [sys.executable, __file__, "--build-mlp", str(directory)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"building the model failed:\n{done.stderr[-3000:]}")
    return np.load(directory.parent / "answer.npy")


def _build_mlp_main(directory: str) -> None:
    import tensorflow as tf

    build_mlp(Path(directory))
    x = np.load(Path(directory).parent / "probe.npy")
    y = tf.saved_model.load(directory).signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    np.save(Path(directory).parent / "answer.npy", y)


def predict_payloads(model: str, rows: Sequence[np.ndarray]) -> list[bytes]:
    """Serialized Predict requests of `model`, one per input array (input "x")."""
    ref = common_pb2.ModelRef(name=model)
    return [predictor_pb2.PredictRequest(model=ref, inputs={"x": array_to_tensor(x)}).SerializeToString() for x in rows]


def check_predict(target: str, model: str, x: np.ndarray, expected: np.ndarray, name: str, metadata=()) -> None:
    """One Predict call before the load: the server must answer what TensorFlow answers in-process."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        predict = channel.unary_unary(
            PREDICT_METHOD,
            predictor_pb2.PredictRequest.SerializeToString,
            predictor_pb2.PredictResponse.FromString,
        )
        request = predictor_pb2.PredictRequest(model=common_pb2.ModelRef(name=model), inputs={"x": array_to_tensor(x)})
        y = tensor_to_array(predict(request, metadata=metadata, timeout=60).outputs["y"])
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-4, err_msg=f"{name} answers differently")


# ---- CPU accounting ------------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (Linux /proc/stat: everything but idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    """CPU seconds so far of each named process, of this one ("cli") and of the whole machine."""
    return {
        **{name: process_cpu_seconds(pid) for name, pid in pids.items()},
        "cli": time.process_time(),
        "machine": machine_busy_seconds(),
    }


def cpu_use(before: dict, after: dict, window: float) -> dict[str, float | None]:
    """Cores each process of two snapshots used in the window; "other" is the rest of the machine."""
    use = {k: None if before[k] is None or after[k] is None else (after[k] - before[k]) / window for k in before}
    machine = use.pop("machine")
    known = [v for v in use.values() if v is not None]
    use["other"] = None if machine is None else max(0.0, machine - sum(known))
    return use


# ---- load generation -----------------------------------------------------------------------------------------


@dataclass
class Load:
    """One closed-loop window: `concurrency` workers each send one request at a time, cycling through the
    payloads; after `warmup` seconds the calls that complete within `duration` seconds are measured."""

    target: str
    payloads: Path
    """A pickled list of request bodies (serialized Predict requests, or HTTP bodies)."""
    concurrency: int
    warmup: float
    duration: float
    pids: dict[str, int] = field(default_factory=dict)
    """The processes whose CPU use is reported, by column name."""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    call_timeout: float = 60.0
    http_path: str = ""
    """Set: JSON POSTs to this path over one keep-alive HTTP/1.1 connection per worker, instead of gRPC Predict
    calls over one shared channel (bytes in, bytes out: responses are not parsed)."""
    method: str = PREDICT_METHOD
    """The gRPC method path the payloads are sent to (e.g. "/inference.GRPCInferenceService/ModelInfer")."""
    connections: int = 1
    """gRPC connections the workers take turns on (worker i uses connection i mod n): a server of several processes
    on one port (SO_REUSEPORT) spreads connections, not calls, over them."""


@dataclass
class LoadResult:
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str
    cpu: dict[str, float | None]
    """Cores used in the window: each of the load's pids, "cli" the load generator, "other" the rest."""


def run_load(load: Load, workdir: Path) -> LoadResult:
    """Runs the window in a child process (its own event loop and CPU account)."""
    spec_path = workdir / "loadgen.json"
    spec_path.write_text(json.dumps({**asdict(load), "payloads": str(load.payloads)}))
    done = subprocess.run(
        [sys.executable, __file__, "--loadgen", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=load.warmup + load.duration + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def write_payloads(path: Path, bodies: list[bytes]) -> Path:
    path.write_bytes(pickle.dumps(bodies))
    return path


async def _grpc_callers(load: Load):
    options = CHANNEL_OPTIONS + ([("grpc.use_local_subchannel_pool", 1)] if load.connections > 1 else [])
    channels = [grpc.aio.insecure_channel(load.target, options=options) for _ in range(max(load.connections, 1))]
    for channel in channels:
        await channel.channel_ready()
    metadata = tuple((k, v) for k, v in load.metadata)

    def caller(channel: grpc.aio.Channel):
        predict = channel.unary_unary(load.method)  # no (de)serializers: bytes in, bytes out

        async def call(payload: bytes) -> None:
            await predict(payload, metadata=metadata, timeout=load.call_timeout)

        return call

    calls = [caller(channel) for channel in channels]

    async def close() -> None:
        for channel in channels:
            await channel.close()

    return [calls[i % len(calls)] for i in range(load.concurrency)], close


def _http_caller(target: str, path: str):
    """A call function over one keep-alive HTTP/1.1 connection of its own."""
    host, port = target.rsplit(":", 1)
    conn: list = []

    async def call(body: bytes) -> None:
        if not conn:
            conn.extend(await asyncio.open_connection(host, int(port)))
        reader, writer = conn
        head = f"POST {path} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            header = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", header).group(1))
            await reader.readexactly(length)
        except Exception:
            writer.close()
            conn.clear()
            raise
        if b" 200 " not in header.split(b"\r\n", 1)[0]:
            raise RuntimeError(header.split(b"\r\n", 1)[0].decode())
        if re.search(rb"(?i)connection:\s*close", header):
            writer.close()
            conn.clear()

    return call


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def _generate(load: Load) -> LoadResult:
    payloads: list[bytes] = pickle.loads(load.payloads.read_bytes())
    if load.http_path:
        calls, close = [_http_caller(load.target, load.http_path) for _ in range(load.concurrency)], None
    else:
        calls, close = await _grpc_callers(load)
    done: list[tuple[float, float]] = []  # (end, latency)
    errors: list[str] = []

    async def worker(index: int) -> None:
        call, k = calls[index], index
        while True:
            payload = payloads[k % len(payloads)]
            k += 1
            start = time.perf_counter()
            try:
                await call(payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - counted and reported, the loop goes on
                errors.append(_describe(exc))
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            done.append((end, end - start))

    tasks = [asyncio.create_task(worker(i)) for i in range(load.concurrency)]
    await asyncio.sleep(load.warmup)
    errors.clear()
    t0, cpu0 = time.perf_counter(), cpu_snapshot(load.pids)
    await asyncio.sleep(load.duration)
    t1, cpu1 = time.perf_counter(), cpu_snapshot(load.pids)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if close is not None:
        await close()
    latencies = sorted(lat for end, lat in done if t0 <= end <= t1)
    return LoadResult(
        len(latencies) / (t1 - t0),
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        len(errors),
        errors[0] if errors else "",
        cpu_use(cpu0, cpu1, t1 - t0),
    )


def _loadgen_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    load = Load(**{**spec, "payloads": Path(spec["payloads"])})
    print(json.dumps(asdict(asyncio.run(_generate(load)))))


# ---- numbers and tables --------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """`value` formatted, or "-" when there is none (None or nan)."""
    if value is None or value != value:
        return "-"
    return f"{value:{spec}}{suffix}"


def milliseconds(value: float) -> str:
    """Three significant digits at most, so the column stays narrow."""
    return fmt(value, ".2f" if value < 10 else ".1f" if value < 100 else ".0f")


def table(title: str, headers: Sequence[str], left: Sequence[str] | None = None, no_wrap: bool = True) -> Table:
    """A rich table with these columns, right-aligned but for the `left` ones (by default the first)."""
    left = headers[:1] if left is None else left
    out = Table(title=title)
    for header in headers:
        out.add_column(header, justify="left" if header in left else "right", no_wrap=no_wrap)
    return out


# ---- profiles (py-spy) ---------------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def profile(pid: int, seconds: int, out: Path, native: bool, during: Callable[[], None]) -> str:
    """Samples `pid` with `py-spy record` (raw collapsed stacks into `out`) while `during()` runs; returns py-spy's
    complaint when it failed, "" when `out` holds the profile."""
    py_spy = py_spy_binary()
    if py_spy is None:
        return "py-spy not found (pip install py-spy into the venv)"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
    command += ["--nonblocking"]  # sample without pausing the process, which would slow it down a lot
    command += ["--format", "raw", "--full-filenames", "--output", str(out), *(["--native"] if native else [])]
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # py-spy attaches
        during()
    finally:
        try:
            _, stderr = sampler.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            sampler.kill()
            _, stderr = sampler.communicate()
    if sampler.returncode != 0 or not out.is_file():
        return f"py-spy failed: {stderr.strip()[-500:]}"
    return ""


def profile_cell(pid: int, run: Callable[[float], object], what: str, args, out: Console, entry: str) -> None:
    """One more load cell (`run(duration)`, returning a result with `calls_per_s`) while py-spy samples `pid` for
    --profile-seconds; prints its hottest Python functions. The raw profile stays in --profile-dir."""
    collapsed = args.profile_dir / f"{what.replace(' ', '-')}-{int(time.time())}.txt"
    seconds = round(args.profile_seconds)
    runs = []
    failure = profile(pid, seconds, collapsed, args.native, lambda: runs.append(run(seconds - 1)))
    if failure:
        out.print(f"--profile: {failure}")
        return
    out.print(f"\nprofile of {what} ({runs[0].calls_per_s:,.0f} req/s under py-spy, which slows it): {collapsed}")
    print_profile(collapsed, out, args.profile_top, f"{what}: CPU samples", entry=entry)


def profile_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--profile and its options."""
    parser.add_argument("--profile", action="store_true", help=f"profile {what} with py-spy after measuring")
    parser.add_argument("--native", action="store_true", help="with --profile: native frames too (py-spy --native)")
    parser.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "modelgrid-bench-profiles")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="with --profile: sampled seconds")
    parser.add_argument("--profile-top", type=int, default=25, help="with --profile: functions listed")


PROFILE_AREAS = (
    ("grpc", "grpc/"),
    ("opentelemetry", "opentelemetry/"),
    ("modelgrid", "services/"),
    ("asyncio", "asyncio/"),
    ("prometheus", "prometheus_client/"),
    ("redis", "redis/"),
)
PLUMBING = ("asyncio/", "runpy", "threading.py", "selectors.py", "__main__.py", "_asynciomodule.c")


def print_profile(collapsed: Path, out: Console, top: int, title: str, entry: str = "") -> None:
    """Self and inclusive shares of samples per function from py-spy's collapsed stacks ("f (file:line);... n"),
    and where the leaf frames are (by package). `entry` is the service's main module (left out of inclusive)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += n
        areas[_area(frames[-1])] += n
        owners[next((_owner(f) for f in reversed(frames) if _owner(f)), "neither (event loop, grpc threads)")] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        out.print("the profile is empty")
        return
    result = Table(title=f"{title} ({total:,} in all): top functions")
    for header in ("self (in the function itself)", "inclusive (event loop and entry frames left out)"):
        result.add_column(header, no_wrap=True, overflow="ellipsis", ratio=1)
    plumbing = (*PLUMBING, entry) if entry else PLUMBING
    wrapping = [
        (k, n)
        for k, n in inclusive.most_common()
        if n < 0.75 * total and not k.startswith("0x") and not any(p in k for p in plumbing)
    ]
    columns = (own.most_common(top), wrapping[:top])
    for i in range(max(len(c) for c in columns)):
        result.add_row(*(f"{c[i][1] / total:4.0%}  {c[i][0]}" if i < len(c) else "" for c in columns))
    out.print(result)
    by_area = ", ".join(f"{area} {n / total:.0%}" for area, n in areas.most_common())
    by_owner = ", ".join(f"{owner} {n / total:.0%}" for owner, n in owners.most_common())
    out.print(
        f"  leaf frames by package: {by_area}; deepest frame of the modelgrid code or of OpenTelemetry: {by_owner}",
        highlight=False,
    )


def _owner(frame: str) -> str:
    where = frame.rpartition(" (")[2]
    return "modelgrid" if where.startswith("services/") else "OpenTelemetry" if "opentelemetry/" in where else ""


def _area(frame: str) -> str:
    where = frame.rpartition(" (")[2]
    for area, marker in PROFILE_AREAS:
        if marker in where:
            return area
    if ".so" in where or where.endswith(".h") or where.endswith(".c"):
        return "native"
    return "other python"


def _frame_name(frame: str) -> str:
    """One entry per function: `proxy (/repo/services/gateway/native.py:31)` -> `proxy (services/gateway/native.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    where = re.sub(r"^.*/lib/python3\.\d+/(site-packages/)?", "", where).removeprefix(f"{REPO_ROOT}/")
    return f"{name} ({where})" if where else name


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    mode, argument = sys.argv[1:3]
    {"--loadgen": _loadgen_main, "--build-mlp": _build_mlp_main}[mode](argument)
