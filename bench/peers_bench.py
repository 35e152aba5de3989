"""modelgrid's predictor against the Python serving peers (MLServer, KServe) on the same SavedModels over OIP gRPC.

What one run does (`make bench-peers`, about 14 minutes on 2 cores; --quick about 3):

* builds two real SavedModels with a `serving_default` signature (input "x", output "y") in this process:
    mlp  784 -> 512 -> 512 -> 10 dense layers, float32[-1, 784]: model time is small, the serving path dominates;
    cnn  four 3x3 convolutions (32-32-64-64 channels, a max-pool after the second), global average pool and a
         dense layer, float32[-1, 32, 32, 3]: a small CNN, about a millisecond of model time per image;
  and calls each in-process (numpy -> tensor -> signature -> numpy) for the reference answers, its batch-1 time
  and the CNN's in-process batch-32 rate (rows/s = 32 / median call time), probed again at the start of every
  round while the servers are idle, best probe kept;
* starts the servers under test, each serving both models, all on free loopback ports:
    modelgrid        `python -m services.predictor` with its own Consul dev agent, Redis and registry (the models
                     pushed to it), with its default dynamic batching settings;
    modelgrid+gw     the same predictor through a gateway (`python -m services.gateway`, auth off: the
                     like-for-like hop; the key lookup's cost is gateway_bench's "gateway+auth" row);
    mlserver adapt   MLServer with bench/peers/mlserver_runtime.py (tf.saved_model.load, the signature called
                     with the request's inputs by name) and adaptive batching (max_batch_size 32,
                     max_batch_time --max-batch-time-ms);
    mlserver         the same without adaptive batching;
    kserve           KServe's Python model server with a kserve.Model subclass (bench/peers/kserve_server.py),
                     gRPC on;
  each peer in its own virtualenv under --peers-dir (`make bench-peers` installs them, pinned by
  bench/peers/*-requirements.txt), with its server's defaults otherwise (MLServer: one parallel inference
  worker process; KServe: one process, predict() on its event loop). Per-request logging is off everywhere
  (modelgrid LOG_LEVEL=WARNING, MLServer debug false, KServe latency logging off and its logger at WARNING), and
  every TensorFlow runs with --tf-threads intra- and inter-op threads;
* checks that every server answers what TensorFlow answers in-process (np.allclose) to one batch-1 request per
  model and to one 32-row CNN request;
* per round (--rounds), per model, per concurrency (1, 8, 32, 64) the servers take turns (in the reverse order on
  every other round), then each server gets one cell of 32-row CNN requests at --rows32-concurrency. A load generator
  in a separate process (harness.run_load) runs c coroutines in a closed loop over --connections grpc.aio channels
  (one by default; each its own connection, the coroutines taking turns), sending pre-serialized
  `inference.GRPCInferenceService/ModelInfer` requests whose tensor travels in raw_input_contents (responses are not
  parsed). After --warmup seconds it measures for --duration seconds: req/s counts the calls that completed inside the
  window, p50/p99 are their latencies. Each cell reports its best round (highest req/s, with that round's latencies
  and CPU): on a shared machine noise only ever slows a run down, so the best of a few rounds is the closest to what
  each server can do.

How to read it: "vs best peer" is a row's req/s over the best peer's (highest req/s of mlserver adapt, mlserver
and kserve) at the same model and concurrency; "vs direct" over modelgrid direct's. "srv ms/req" is the CPU time
every process of the server spent per completed request (all threads and worker processes; through the gateway:
predictor and gateway), "gw ms/req" the gateway's share; these depend less on how busy the machine is than req/s.
CPU columns are in cores (2.0 is the whole machine): "srv" the server under test (through the gateway: predictor and
gateway), "cli" the load generator, "other" the rest of the machine (idle servers, neighbours). "runs" lists every
round's req/s: their spread is the noise. The load generator shares the 2 cores with the server under test, the
same way for every server. Quote ratios measured in one run, not absolute numbers. The last lines check the
targets of issue 11.

Several processes: `--processes 2` runs modelgrid's predictor and gateway as replicas of two serving processes on
one port (PROCESSES, kit.replica). The kernel spreads connections, not calls, over them, so give the load generator
several connections (`--connections 4`): every server then gets the same four.

`--profile` runs one more modelgrid cell (the first model, the highest concurrency) while py-spy samples the predictor
(its last serving process) and prints where its CPU goes.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import harness
import numpy as np
from harness import (
    CHANNEL_OPTIONS,
    REPO_ROOT,
    Load,
    LoadResult,
    Mesh,
    console,
    fmt,
    load_average,
    milliseconds,
    percentile,
    process_tree,
    profile_args,
    profile_cell,
    push_models,
    run_load,
    table,
    tmp_root_arg,
    work_dir,
    write_payloads,
)
from rich.console import Console

from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.oip import grpc_service_pb2 as oip
from modelgrid.oip import grpc_service_pb2_grpc as oip_grpc
from services.kit.localinfra import free_port

OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"
DIRECT, GATEWAY = "modelgrid", "modelgrid+gw"
MLSERVER_ADAPTIVE, MLSERVER, KSERVE = "mlserver adapt", "mlserver", "kserve"
PEERS = (MLSERVER_ADAPTIVE, MLSERVER, KSERVE)
PAYLOADS = 16  # distinct inputs cycled by the load generator
ROWS = 32  # rows of the CNN's batch requests, and the in-process batch they are compared with
CALL_TIMEOUT_S = 60.0
PEER_PACKAGES = {"mlserver": ("mlserver", "tensorflow", "grpcio"), "kserve": ("kserve", "tensorflow", "grpcio")}


# ---- models --------------------------------------------------------------------------------------------------------


def build_mlp(directory: Path) -> None:
    """784 -> 512 -> 512 -> 10 dense layers with ReLU between them."""
    harness.build_mlp(directory, dims=(784, 512, 512, 10))


def build_cnn(directory: Path) -> None:
    """Four 3x3 convolutions with ReLU (max-pool after the second), global average pool, dense to 10."""
    harness.build_cnn(directory, widths=(32, 32, 64, 64), pool_after=(1,))


@dataclass(frozen=True)
class ModelSpec:
    key: str
    description: str
    row_shape: tuple[int, ...]
    build: Callable[[Path], None]

    @property
    def name(self) -> str:
        """The model's name on every server (and in the registry)."""
        return f"peers-{self.key}"


MODELS = {
    "mlp": ModelSpec("mlp", "MLP 784-512-512-10", (784,), build_mlp),
    "cnn": ModelSpec("cnn", "CNN 4x conv3x3 32-32-64-64", (32, 32, 3), build_cnn),
}


@dataclass
class Workload:
    """One model: its directory, what the load generator sends, and TensorFlow's own answers in-process."""

    spec: ModelSpec
    path: Path
    call: Callable[[np.ndarray], np.ndarray]
    payloads: Path
    sample: np.ndarray
    expected: np.ndarray
    batch_payloads: Path | None = None
    batch_sample: np.ndarray | None = None
    batch_expected: np.ndarray | None = None
    b1_runs: list[float] = field(default_factory=list)
    """In-process batch-1 ms per call: the first measurement, then one probe per round."""
    limit_runs: list[float] = field(default_factory=list)
    """In-process batch-32 rows/s (CNN): the first measurement, then one probe per round."""

    @property
    def b1_ms(self) -> float:
        return min(self.b1_runs) if self.b1_runs else float("nan")

    @property
    def limit(self) -> float:
        return max(self.limit_runs) if self.limit_runs else float("nan")

    def probe(self, seconds: float) -> None:
        """The model in-process at batch 1 and, with batch payloads, at batch 32 (best values are kept)."""
        self.b1_runs.append(median_call_seconds(self.call, self.sample, seconds / 2) * 1e3)
        if self.batch_payloads is not None:
            x = np.random.default_rng(6).random((ROWS, *self.spec.row_shape), dtype=np.float32)
            self.limit_runs.append(ROWS / median_call_seconds(self.call, x, seconds))


def median_call_seconds(call: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    """Median time of in-process calls over `seconds` (a stall from a neighbour does not move the median)."""
    for _ in range(3):  # the first calls at a new shape build and cache kernels
        call(x)
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        t = time.perf_counter()
        call(x)
        latencies.append(time.perf_counter() - t)
    return percentile(sorted(latencies), 50)


def infer_payloads(model: str, arrays: list[np.ndarray]) -> list[bytes]:
    """Serialized OIP ModelInferRequests of `model`, input "x" in raw_input_contents, one per array."""
    return [
        oip.ModelInferRequest(
            model_name=model,
            inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))],
            raw_input_contents=[x.tobytes()],
        ).SerializeToString()
        for x in arrays
    ]


def prepare(spec: ModelSpec, workdir: Path, args, out: Console) -> Workload:
    """Builds the model, loads it in this process, and writes what the load generator sends."""
    import tensorflow as tf

    path = workdir / f"model-{spec.key}"
    spec.build(path)
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]

    def call(x: np.ndarray, _keep=loaded) -> np.ndarray:
        return signature(x=tf.convert_to_tensor(x))["y"].numpy()

    rng = np.random.default_rng(4)
    rows = [rng.random((1, *spec.row_shape), dtype=np.float32) for _ in range(PAYLOADS)]
    payloads = write_payloads(workdir / f"{spec.key}-b1.pkl", infer_payloads(spec.name, rows))
    work = Workload(spec, path, call, payloads, rows[0], call(rows[0]))
    if spec.key == "cnn":
        batches = [rng.random((ROWS, *spec.row_shape), dtype=np.float32) for _ in range(4)]
        work.batch_payloads = write_payloads(workdir / f"{spec.key}-b{ROWS}.pkl", infer_payloads(spec.name, batches))
        work.batch_sample, work.batch_expected = batches[0], call(batches[0])
    work.probe(args.limit_seconds)
    out.print(
        f"  {spec.key} ({spec.description}) in-process: batch 1 {work.b1_ms:.2f} ms per call"
        + (f", batch {ROWS} {work.limit:,.0f} rows/s" if work.limit_runs else ""),
        highlight=False,
    )
    return work


# ---- servers -------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One server under test as the load generator reaches it."""

    name: str
    target: str
    pid: int
    gateway_pid: int = 0
    """Through the gateway: the gateway's pid (`pid` is the predictor's)."""
    pids: dict[str, int] = field(default_factory=dict)

    def collect_pids(self) -> None:
        """The processes whose CPU counts ("srv*", "gw*"), workers included: call once the server is ready."""
        self.pids = {f"srv{i}": pid for i, pid in enumerate(process_tree(self.pid))}
        if self.gateway_pid:
            self.pids.update({f"gw{i}": pid for i, pid in enumerate(process_tree(self.gateway_pid))})


def oip_ready(target: str, models: list[str]) -> bool:
    """The server answers OIP and has every model ready."""
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            if not stub.ServerLive(oip.ServerLiveRequest(), timeout=2).live:
                return False
            return all(stub.ModelReady(oip.ModelReadyRequest(name=m), timeout=2).ready for m in models)
    except grpc.RpcError:
        return False


def wait_ready(name: str, pid: int, ready: Callable[[], bool], log: Path, timeout: float) -> None:
    """Until `ready()`, failing early when the process is gone or MLServer keeps restarting a dying worker."""
    deadline = time.monotonic() + timeout
    while not ready():
        state = process_state(pid)
        crashing = log.is_file() and "stopped unexpectedly" in log.read_text()
        if state in (None, "Z") or crashing or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.is_file() else ""
            raise RuntimeError(f"{name} did not start (state {state}); log {log}:\n{tail}")
        time.sleep(0.5)


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def start_mlserver(mesh: Mesh, label: str, adaptive: bool, works: list[Workload], args) -> Endpoint:
    """An MLServer with both models (bench/peers/mlserver_runtime.py), started but maybe not yet ready."""
    root = mesh.workdir / label.replace(" ", "-")
    grpc_port = free_port()
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "parallel_workers": args.mlserver_workers,
        "environments_dir": str(root / ".envs"),
        "metrics_dir": str(root / ".metrics"),
    }
    (root / ".metrics").mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    for work in works:
        model = {
            "name": work.spec.name,
            "implementation": "mlserver_runtime.SavedModelRuntime",
            "parameters": {"uri": str(work.path), "extra": {"tf_threads": args.tf_threads}},
        }
        if adaptive:
            model.update(max_batch_size=args.max_batch_size, max_batch_time=args.max_batch_time_ms / 1e3)
        (root / work.spec.name).mkdir()
        (root / work.spec.name / "model-settings.json").write_text(json.dumps(model, indent=2))
    argv = [str(args.peers_dir / "mlserver" / "bin" / "mlserver"), "start", str(root)]
    env = {"PYTHONPATH": str(REPO_ROOT / "bench" / "peers")}
    pid = mesh.process(label, argv, lambda: True, env=env, tree=True)
    return Endpoint(label, f"127.0.0.1:{grpc_port}", pid)


def start_kserve(mesh: Mesh, works: list[Workload], args) -> Endpoint:
    """KServe's model server with both models (bench/peers/kserve_server.py), started but maybe not yet ready."""
    grpc_port = free_port()
    argv = [str(args.peers_dir / "kserve" / "bin" / "python"), str(REPO_ROOT / "bench" / "peers" / "kserve_server.py")]
    argv += [f"--grpc_port={grpc_port}", f"--http_port={free_port()}", "--enable_latency_logging=false"]
    argv += [f"--tf-threads={args.tf_threads}", *(f"--savedmodel={w.spec.name}={w.path}" for w in works)]
    pid = mesh.process(KSERVE, argv, lambda: True, tree=True)
    return Endpoint(KSERVE, f"127.0.0.1:{grpc_port}", pid)


def wait_for_routes(target: str, models: list[str], timeout: float = 60) -> None:
    """Until the gateway's routing table holds a predictor tagged with every model."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        admin = gateway_pb2_grpc.GatewayAdminStub(channel)
        while True:
            routes = admin.GetRoutes(gpb.GetRoutesRequest(), timeout=10).routes
            tags = [t for r in routes if r.service == "predictor" for u in r.upstreams for t in u.tags]
            if all(any(f"model={m}" in t for t in tags) for m in models):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway at {target} never routed to the predictor: {routes}")
            time.sleep(0.2)


def start_servers(mesh: Mesh, works: list[Workload], args, out: Console) -> dict[str, Endpoint]:
    """Every server under test, ready: the peers start first (they load TensorFlow meanwhile), then the mesh."""
    started = time.monotonic()
    peers = [
        start_mlserver(mesh, MLSERVER_ADAPTIVE, True, works, args),
        start_mlserver(mesh, MLSERVER, False, works, args),
        start_kserve(mesh, works, args),
    ]
    names = [w.spec.name for w in works]
    registry = mesh.registry().target
    push_models(registry, {w.spec.name: (w.path, w.spec.description) for w in works}, "peers-bench")
    predictor = mesh.start(
        "predictor",
        timeout=240,
        REGISTRY_TARGET=registry,
        MODELS=json.dumps([{"name": n} for n in names]),
        CACHE_DIR=str(mesh.workdir / "cache"),
        METRICS_PORT=str(free_port()),
        TF_THREADS=str(args.tf_threads),
        PROCESSES=str(args.processes),
    )
    gateway = mesh.start(
        "gateway", WEB_PORT="-1", METRICS_PORT=str(free_port()), AUTH_ENABLED="false", PROCESSES=str(args.processes)
    )
    wait_for_routes(gateway.target, names)
    endpoints = {
        DIRECT: Endpoint(DIRECT, predictor.target, predictor.process.pid),
        GATEWAY: Endpoint(GATEWAY, gateway.target, predictor.process.pid, gateway.process.pid),
    }
    for peer in peers:
        wait_ready(peer.name, peer.pid, lambda p=peer: oip_ready(p.target, names), mesh.log(peer.name), 300)
        endpoints[peer.name] = peer
    for endpoint in endpoints.values():
        endpoint.collect_pids()
    out.print(f"  {len(endpoints)} servers up after {time.monotonic() - started:.0f} s", highlight=False)
    return endpoints


def output_array(reply: oip.ModelInferResponse, name: str) -> np.ndarray:
    """An FP32 output of a ModelInferResponse, raw or typed."""
    index = [o.name for o in reply.outputs].index(name)
    tensor = reply.outputs[index]
    if reply.raw_output_contents:
        return np.frombuffer(reply.raw_output_contents[index], dtype=np.float32).reshape(list(tensor.shape))
    return np.array(tensor.contents.fp32_contents, dtype=np.float32).reshape(list(tensor.shape))


def check_answers(endpoint: Endpoint, works: list[Workload]) -> None:
    """One request per model (and one 32-row CNN request): the server must answer what TensorFlow answers."""
    with grpc.insecure_channel(endpoint.target, options=CHANNEL_OPTIONS) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for work in works:
            cases = [(work.sample, work.expected)]
            if work.batch_sample is not None:
                cases.append((work.batch_sample, work.batch_expected))
            for x, expected in cases:
                request = oip.ModelInferRequest.FromString(infer_payloads(work.spec.name, [x])[0])
                y = output_array(stub.ModelInfer(request, timeout=CALL_TIMEOUT_S), "y")
                if y.shape != expected.shape or not np.allclose(y, expected, rtol=1e-3, atol=1e-4):
                    raise AssertionError(f"{endpoint.name} answers {work.spec.key} {x.shape} differently from TF")


def versions(args) -> dict[str, str]:
    """Which versions run: the project's venv and each peer's."""
    mine = {p: importlib.metadata.version(p) for p in ("tensorflow", "grpcio")}
    found = {"modelgrid": f"tensorflow {mine['tensorflow']}, grpcio {mine['grpcio']}"}
    for peer, packages in PEER_PACKAGES.items():
        script = "import importlib.metadata as m, sys; print(', '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))"
        python = args.peers_dir / peer / "bin" / "python"
        done = subprocess.run([str(python), "-c", script, *packages], capture_output=True, text=True, timeout=60)
        found[peer] = done.stdout.strip() if done.returncode == 0 else f"unknown ({done.stderr.strip()[-200:]})"
    return found


# ---- measuring -----------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (model, rows per request, concurrency, server): the best of its rounds."""

    server: str
    model: str
    rows: int
    concurrency: int
    best: LoadResult
    runs: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.best.calls_per_s

    def cpu(self, prefix: str) -> float | None:
        """Cores used by the processes whose CPU key starts with `prefix` ("srv", "gw"): 0 when there are none,
        None when one is unknown."""
        values = [v for k, v in self.best.cpu.items() if k.startswith(prefix)]
        return None if None in values else sum(values)

    @property
    def server_cores(self) -> float | None:
        """Cores of every server process on the path (through the gateway: predictor and gateway)."""
        srv, gw = self.cpu("srv"), self.cpu("gw")
        return None if srv is None or gw is None else srv + gw

    def ms_per_request(self, *prefixes: str) -> float | None:
        used = [self.cpu(p) for p in prefixes]
        if None in used or not self.rate:
            return None
        return sum(u for u in used if u is not None) / self.rate * 1e3


def run_cell(endpoint: Endpoint, payloads: Path, concurrency: int, args, workdir: Path) -> LoadResult:
    load = Load(
        endpoint.target,
        payloads,
        concurrency,
        args.warmup,
        args.duration,
        pids=endpoint.pids,
        call_timeout=CALL_TIMEOUT_S,
        method=OIP_METHOD,
        connections=args.connections,
    )
    return run_load(load, workdir)


def profile_predictor(endpoint: Endpoint, work: Workload, concurrency: int, args, workdir: Path, out: Console) -> None:
    """One more modelgrid cell while py-spy samples the predictor (its last serving process, when it has several)."""

    def run(seconds: float) -> LoadResult:
        shorter = argparse.Namespace(**{**vars(args), "duration": seconds})
        return run_cell(endpoint, work.payloads, concurrency, shorter, workdir)

    what = f"{endpoint.name} {work.spec.key} at c={concurrency}"
    profile_cell(list(endpoint.pids.values())[-1], run, what, args, out, entry="services/predictor/main.py")


def measure(endpoints: dict[str, Endpoint], works: list[Workload], args, workdir: Path, out: Console) -> list[Cell]:
    """Every cell, round after round; within a round the servers take turns at each (model, concurrency), in the
    reverse order on every other round."""
    samples: dict[tuple[str, str, int, int], list[LoadResult]] = {}

    def one(endpoint: Endpoint, work: Workload, rows: int, concurrency: int, payloads: Path, round_number: int):
        result = run_cell(endpoint, payloads, concurrency, args, workdir)
        samples.setdefault((endpoint.name, work.spec.key, rows, concurrency), []).append(result)
        srv = sum(v for k, v in result.cpu.items() if k.startswith(("srv", "gw")) and v is not None)
        out.print(
            f"  round {round_number}/{args.rounds} {work.spec.key} b={rows} c={concurrency:<3} {endpoint.name:<15}"
            f"{result.calls_per_s:8,.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
            f"srv {srv:.2f} cli {fmt(result.cpu.get('cli'))} other {fmt(result.cpu.get('other'))} cores"
            + (f"  {result.errors} errors: {result.first_error[:80]}" if result.errors else ""),
            highlight=False,
        )

    for round_number in range(1, args.rounds + 1):
        order = list(endpoints.values()) if round_number % 2 else list(reversed(endpoints.values()))
        for work in works:
            work.probe(args.limit_seconds)  # the servers are idle meanwhile
            for concurrency in args.concurrency:
                for endpoint in order:
                    one(endpoint, work, 1, concurrency, work.payloads, round_number)
        for work in works:
            if work.batch_payloads is not None:
                for endpoint in order:
                    one(endpoint, work, ROWS, args.rows32_concurrency, work.batch_payloads, round_number)
    cells = []
    for (server, model, rows, concurrency), results in samples.items():
        best = max(results, key=lambda r: r.calls_per_s)
        runs = [r.calls_per_s for r in results]
        cells.append(Cell(server, model, rows, concurrency, best, runs, sum(r.errors for r in results)))
    return cells


# ---- report --------------------------------------------------------------------------------------------------------


class Results:
    """The cells by (server, model, rows, concurrency), with the comparisons the tables and targets need."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.by = {(c.server, c.model, c.rows, c.concurrency): c for c in cells}

    def get(self, server: str, model: str, concurrency: int, rows: int = 1) -> Cell | None:
        return self.by.get((server, model, rows, concurrency))

    def best_peer(self, model: str, concurrency: int, rows: int = 1, key=lambda c: c.rate) -> Cell | None:
        """The peer with the highest `key` at this model, rows and concurrency."""
        peers = [c for p in PEERS if (c := self.get(p, model, concurrency, rows))]
        return max(peers, key=key) if peers else None


HEADERS = ("server", "c", "req/s", "p50 ms", "p99 ms", "vs best peer", "vs direct", "srv ms/req", "gw ms/req")
HEADERS += ("cpu srv", "cli", "other", "runs req/s", "err")


def ratio(value: float, base: Cell | None) -> str:
    return fmt(value / base.rate if base and base.rate else None, ".2f", "x")


def runs_text(cell: Cell) -> str:
    return "/".join(f"{r:,.0f}" for r in cell.runs) if len(cell.runs) > 1 else ""


def errors_text(cell: Cell) -> str:
    return f"{cell.errors} {cell.best.first_error[:40]}" if cell.errors else ""


def print_model_table(out: Console, results: Results, work: Workload, servers: list[str], args) -> None:
    title = (
        f"{work.spec.description}, batch-1 OIP ModelInfer (raw tensors), best of {args.rounds} round(s) of "
        f"{args.duration:g} s; in-process batch 1: {work.b1_ms:.2f} ms per call (best of {len(work.b1_runs)})"
    )
    result = table(title, HEADERS, left=("server", "runs req/s", "err"))
    for i, concurrency in enumerate(args.concurrency):
        if i:
            result.add_section()
        best_peer, direct = (
            results.best_peer(work.spec.key, concurrency),
            results.get(DIRECT, work.spec.key, concurrency),
        )
        for server in servers:
            cell = results.get(server, work.spec.key, concurrency)
            if cell is None:
                continue
            result.add_row(
                server,
                str(concurrency),
                f"{cell.rate:,.0f}",
                milliseconds(cell.best.p50_ms),
                milliseconds(cell.best.p99_ms),
                ratio(cell.rate, best_peer),
                ratio(cell.rate, direct),
                fmt(cell.ms_per_request("srv", "gw"), ".3f"),
                fmt(cell.ms_per_request("gw"), ".3f") if server == GATEWAY else "",
                fmt(cell.server_cores, ".2f"),
                fmt(cell.best.cpu.get("cli"), ".2f"),
                fmt(cell.best.cpu.get("other"), ".2f"),
                runs_text(cell),
                errors_text(cell),
            )
    out.print(result)


def print_batch_table(out: Console, results: Results, work: Workload, servers: list[str], args) -> None:
    title = (
        f"{work.spec.description}, {ROWS}-row requests at c={args.rows32_concurrency}: rows/s against the in-process "
        f"batch-{ROWS} rate {work.limit:,.0f} rows/s (best of {len(work.limit_runs)} probes)"
    )
    headers = ("server", "c", "req/s", "rows/s", "vs in-process", "p50 ms", "p99 ms", "srv ms/req", "cpu srv")
    result = table(title, (*headers, "cli", "other", "runs req/s", "err"), left=("server", "runs req/s", "err"))
    for server in servers:
        cell = results.get(server, work.spec.key, args.rows32_concurrency, ROWS)
        if cell is None:
            continue
        result.add_row(
            server,
            str(cell.concurrency),
            f"{cell.rate:,.0f}",
            f"{cell.rate * ROWS:,.0f}",
            fmt(cell.rate * ROWS / work.limit * 100, ".0f", "%"),
            milliseconds(cell.best.p50_ms),
            milliseconds(cell.best.p99_ms),
            fmt(cell.ms_per_request("srv", "gw"), ".3f"),
            fmt(cell.server_cores, ".2f"),
            fmt(cell.best.cpu.get("cli"), ".2f"),
            fmt(cell.best.cpu.get("other"), ".2f"),
            runs_text(cell),
            errors_text(cell),
        )
    out.print(result)


def verdict(ok: bool) -> str:
    return "met   " if ok else "MISSED"


def target_lines(results: Results, works: list[Workload], args) -> list[str]:
    """The targets of issue 11, each with met/MISSED (n/a where the cell was not measured)."""
    lines = []
    for work in works:
        key = work.spec.key
        direct, peer = results.get(DIRECT, key, 64), results.best_peer(key, 64)
        if direct and peer:
            times = direct.rate / peer.rate
            lines.append(
                f"{verdict(times >= 3)}  {key} c=64: modelgrid {direct.rate:,.0f} req/s / best peer {peer.server} "
                f"{peer.rate:,.0f} req/s = {times:.2f}x (target >= 3x)"
            )
            lines.append(
                f"{verdict(direct.best.p99_ms <= 50)}  {key} c=64: modelgrid p99 {direct.best.p99_ms:.1f} ms "
                "(target <= 50 ms)"
            )
        else:
            lines.append(f"n/a     {key} c=64 was not measured")
        direct, peer = results.get(DIRECT, key, 1), results.best_peer(key, 1, key=lambda c: -c.best.p50_ms)
        if direct and peer:
            lines.append(
                f"{verdict(direct.best.p50_ms <= peer.best.p50_ms)}  {key} c=1: modelgrid p50 {direct.best.p50_ms:.2f} "
                f"ms, best peer {peer.server} {peer.best.p50_ms:.2f} ms (target: no higher)"
            )
        gateway, direct64 = results.get(GATEWAY, key, 64), results.get(DIRECT, key, 64)
        if gateway and direct64:
            share = gateway.rate / direct64.rate
            lines.append(
                f"{verdict(share >= 0.8)}  {key} c=64: through the gateway {gateway.rate:,.0f} req/s = {share:.2f}x "
                f"direct (target >= 0.8x)"
            )
        gateway, direct1 = results.get(GATEWAY, key, 1), results.get(DIRECT, key, 1)
        if gateway and direct1:
            added = gateway.best.p50_ms - direct1.best.p50_ms
            lines.append(f"{verdict(added <= 1)}  {key} c=1: the gateway adds {added:+.2f} ms at p50 (target <= 1 ms)")
        if work.batch_payloads is not None:
            cell = results.get(DIRECT, key, args.rows32_concurrency, ROWS)
            if cell:
                share = cell.rate * ROWS / work.limit
                lines.append(
                    f"{verdict(share >= 0.8)}  {key} {ROWS}-row requests: modelgrid {cell.rate * ROWS:,.0f} rows/s = "
                    f"{share:.0%} of in-process batch {ROWS} {work.limit:,.0f} rows/s (target >= 80%)"
                )
    return lines


def noise_warning(results: Results) -> str:
    others = [c.best.cpu.get("other") for c in results.cells if c.best.cpu.get("other") is not None]
    mean = sum(others) / len(others) if others else 0.0
    if mean < 0.25:
        return ""
    return (
        f"WARNING: other processes used {mean:.2f} of {os.cpu_count()} cores on average during the measured windows "
        "(column 'other'): absolute numbers are unreliable and even ratios are noisy; rerun on a quiet machine"
    )


# ---- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-dir", type=Path, default=REPO_ROOT / ".bench" / "peers", help="the peers' venvs")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell reports its best")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated requests in flight")
    parser.add_argument("--rows32-concurrency", type=int, default=4, help=f"requests in flight of {ROWS} rows")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of: mlp, cnn")
    parser.add_argument("--tf-threads", type=int, default=2, help="TF intra- and inter-op threads everywhere")
    parser.add_argument("--max-batch-size", type=int, default=32, help="MLServer adaptive batching: max_batch_size")
    parser.add_argument("--max-batch-time-ms", type=float, default=2.0, help="MLServer adaptive: max_batch_time")
    parser.add_argument("--mlserver-workers", type=int, default=1, help="MLServer parallel_workers (its default 1)")
    parser.add_argument("--limit-seconds", type=float, default=1.5, help="seconds of each in-process probe")
    parser.add_argument("--connections", type=int, default=1, help="the load generator's gRPC connections")
    parser.add_argument("--processes", type=int, default=1, help="modelgrid's PROCESSES (predictor and gateway)")
    parser.add_argument("--quick", action="store_true", help="one round, c=1,64, short cells: about 3 minutes")
    profile_args(parser, "modelgrid's predictor (one serving process) at the highest concurrency")
    tmp_root_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.concurrency, args.limit_seconds = 1.5, 1.0, 1, "1,64", 1.0
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    if unknown := set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODELS)}")
    args.peers_dir = args.peers_dir.resolve()
    for peer in PEER_PACKAGES:
        if not (args.peers_dir / peer / "bin" / "python").is_file():
            parser.error(f"no {peer} virtualenv in {args.peers_dir / peer}: `make bench-peers` installs it")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, here and in the children
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    args = parse_args(argv)
    out = console(190)
    started = time.monotonic()
    found = versions(args)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
    with work_dir("modelgrid-peers-bench-", args.tmp_root) as workdir:
        out.print(
            f"work dir {workdir}; {os.cpu_count()} CPUs, load average {load_average():.1f} at start; {args.rounds} "
            f"round(s) of {args.warmup:g} s warm-up + {args.duration:g} s per cell; concurrency {args.concurrency}; "
            f"TF threads {args.tf_threads}",
            highlight=False,
        )
        for name, text in found.items():
            out.print(f"  {name}: {text}", highlight=False)
        works = [prepare(MODELS[key], workdir, args, out) for key in args.models]
        with Mesh(workdir, LOG_LEVEL="WARNING", CONSUL_CHECK_INTERVAL="1s") as mesh:
            endpoints = start_servers(mesh, works, args, out)
            for endpoint in endpoints.values():
                check_answers(endpoint, works)
            out.print(f"  every server answers as TensorFlow does in-process ({', '.join(endpoints)})")
            results = Results(measure(endpoints, works, args, workdir, out))
            if args.profile:
                profile_predictor(endpoints[DIRECT], works[0], max(args.concurrency), args, workdir, out)
    out.print()
    servers = list(endpoints)
    for work in works:
        print_model_table(out, results, work, servers, args)
    for work in works:
        if work.batch_payloads is not None:
            print_batch_table(out, results, work, servers, args)
    out.print(
        f"  versions: modelgrid ({found['modelgrid']}); mlserver ({found['mlserver']}); kserve ({found['kserve']})",
        highlight=False,
    )
    out.print(
        f"  modelgrid: predictor with its default batching settings, gateway with auth off; "
        f"mlserver adapt: max_batch_size {args.max_batch_size}, max_batch_time {args.max_batch_time_ms:g} ms; "
        f"MLServer parallel_workers {args.mlserver_workers}; TF threads {args.tf_threads} everywhere",
        highlight=False,
    )
    out.print(
        f"  best of {args.rounds} interleaved round(s) per cell (runs: req/s of each); srv ms/req: CPU of the server's "
        "processes per request (through the gateway: predictor + gateway), gw ms/req: the gateway's; cpu in cores "
        f"(2.0 = both); load average {load_average():.1f} at the end",
        highlight=False,
    )
    for line in filter(None, [noise_warning(results), *target_lines(results, works, args)]):
        out.print(line, highlight=False)
    out.print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
