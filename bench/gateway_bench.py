"""Gateway overhead: predictor throughput and latency at the same concurrency directly and through the gateway.

What one run does (`make bench-gateway`, about 3.5 minutes on 2 cores; --quick about 1):

* builds a small real SavedModel, an MLP 64 -> 256 -> 256 -> 10 with input "x" float32[-1, 64]: model time is tiny,
  so the serving path (and the gateway in front of it) dominates;
* starts its own Consul dev agent, Redis server and registry on free loopback ports, pushes the model, and starts
  ONE predictor serving it (dynamic batching on, the predictor's default batch size and queue delay) and two
  gateways in front of it: "gateway" with auth off, and "gateway+auth" with AUTH_ENABLED and an API key of scope
  PREDICT whose rate limit is far above the load (so every call pays the key lookup and the token bucket script
  in Redis, and none is refused); web front and metrics port off;
* checks that one request answers what TensorFlow answers in-process on every path;
* per round, per concurrency (--concurrency, default 32, 8, 128) the paths take turns at the same load: direct,
  gateway, gateway+auth, and in the reverse order on every other round (ABBA), so drift on a shared machine
  hits direct and gateway alike. A load generator in a separate process runs c coroutines in a closed loop over
  one grpc.aio channel, each sending single-row Predict requests (pre-serialized bytes, responses not parsed).
  After --warmup seconds it measures for --duration seconds: req/s counts the calls that completed inside the
  window, p50/p99 are their latencies. Each row reports the median over --rounds rounds.

How to read it: "vs direct" is the row's median req/s over the direct path's at the same concurrency (the
issue's target: the gateway keeps >= 85% of direct throughput at c=32); "+p50 ms" is the latency the gateway adds
at the median. "runs" lists every round's req/s, and for gateway rows the ratio of each round to the direct run
of the same round: their spread is the noise. CPU is in cores (2.0 is the whole machine): "pred" the predictor,
"gw" the gateway under test, "redis" Redis (the auth row's key lookups and rate limits), "cli" the load
generator, "other" the rest of the machine (idle services, neighbours). "gw ms/req" is the gateway's CPU time
per completed call and "all ms/req" that of every process on the path (predictor, gateway, Redis, load
generator): these depend far less on how busy the machine is than req/s does. On 2 cores the load generator,
the gateway and the predictor share the CPU, so once the machine is saturated the throughput ratio tends to the
ratio of CPU spent per call, direct "all ms/req" over the gateway's; the last line says how cheap the gateway
must be for the target.

--profile runs one more gateway cell at the first concurrency under `py-spy record` (not a project dependency:
pip install py-spy) and prints the gateway's hottest Python functions; the raw profile stays in --profile-dir.
"""

import argparse
import asyncio
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.support lives in the repo, not in the installed package

from bench.common import build_mlp, fmt, machine_busy_seconds, percentile, process_cpu_seconds  # noqa: E402
from modelgrid.common.v1 import common_pb2  # noqa: E402
from modelgrid.gateway.v1 import gateway_pb2 as gpb  # noqa: E402
from modelgrid.gateway.v1 import gateway_pb2_grpc  # noqa: E402
from modelgrid.predictor.v1 import predictor_pb2 as pb  # noqa: E402
from services.kit.localinfra import ConsulAgent, RedisServer  # noqa: E402
from services.kit.tensors import array_to_tensor, tensor_to_array  # noqa: E402
from services.registry.client import RegistryClient  # noqa: E402
from tests.support import ServiceProcess  # noqa: E402

MODEL = "bench-gw-mlp"
PREDICT_METHOD = "/modelgrid.predictor.v1.Predictor/Predict"
PAYLOADS = 16  # distinct single-row inputs cycled by the load generator
CALL_TIMEOUT_S = 30.0
ADMIN_KEY = "gateway-bench-admin"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]  # loopback only: never through a proxy from the environment
DIRECT, GATEWAY, GATEWAY_AUTH = "direct", "gateway", "gateway+auth"
TARGET_CONCURRENCY, TARGET_RATIO = 32, 0.85
PATH_PROCESSES = ("pred", "gw", "redis", "cli")  # the processes a call's CPU time is spent in


def build_model_main(directory: str) -> None:
    """Builds the SavedModel into `directory` and writes what it answers for the probe input (probe.npy there) to
    answer.npy: TensorFlow runs in this child process only, so the bench process stays small."""
    import tensorflow as tf

    build_mlp(Path(directory))
    x = np.load(Path(directory) / "probe.npy")
    y = tf.saved_model.load(directory).signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    np.save(Path(directory).parent / "answer.npy", y)


def build_model(workdir: Path, probe: np.ndarray) -> tuple[Path, np.ndarray]:
    """The SavedModel directory and its in-process answer to `probe`."""
    directory = workdir / "model"
    directory.mkdir()
    np.save(directory / "probe.npy", probe)
    done = subprocess.run(
        [sys.executable, __file__, "--build-model", str(directory)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the model failed:\n{done.stderr[-3000:]}")
    (directory / "probe.npy").unlink()
    return directory, np.load(workdir / "answer.npy")


# ---- load generator (runs in its own process: `gateway_bench.py --loadgen SPEC`) --------------------------------


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {
        **{name: process_cpu_seconds(pid) for name, pid in pids.items()},
        "cli": time.process_time(),
        "machine": machine_busy_seconds(),
    }


def _cpu_use(before: dict, after: dict, window: float) -> dict[str, float | None]:
    """Cores each tracked process used in the window; "other" is the rest of the machine."""
    use = {k: None if before[k] is None or after[k] is None else (after[k] - before[k]) / window for k in before}
    machine = use.pop("machine")
    known = [v for v in use.values() if v is not None]
    use["other"] = None if machine is None else max(0.0, machine - sum(known))
    return use


async def run_load(spec: dict) -> dict:
    """Closed loop: `concurrency` coroutines each send one request at a time until the window ends."""
    payloads: list[bytes] = pickle.loads(Path(spec["payloads"]).read_bytes())
    metadata = tuple((k, v) for k, v in spec["metadata"])
    channel = grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS)
    await channel.channel_ready()
    predict = channel.unary_unary(PREDICT_METHOD)  # no (de)serializers: bytes in, bytes out
    done: list[tuple[float, float]] = []  # (end, latency)
    errors: list[str] = []

    async def worker(index: int) -> None:
        k = index
        while True:
            payload = payloads[k % len(payloads)]
            k += 1
            start = time.perf_counter()
            try:
                await predict(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            done.append((end, end - start))

    tasks = [asyncio.create_task(worker(i)) for i in range(spec["concurrency"])]
    await asyncio.sleep(spec["warmup"])
    errors.clear()
    t0, cpu0 = time.perf_counter(), _cpu_snapshot(spec["pids"])
    await asyncio.sleep(spec["duration"])
    t1, cpu1 = time.perf_counter(), _cpu_snapshot(spec["pids"])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    latencies = sorted(lat for end, lat in done if t0 <= end <= t1)
    return {
        "req_per_s": len(latencies) / (t1 - t0),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "cpu": _cpu_use(cpu0, cpu1, t1 - t0),
    }


def loadgen_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    print(json.dumps(asyncio.run(run_load(spec))))


# ---- the mesh ------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach the predictor: the target the load generator calls, with what it sends and watches."""

    name: str
    target: str
    metadata: list[tuple[str, str]] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    """Processes whose CPU use is reported: "pred", and through a gateway "gw" (with auth on also "redis")."""


def _service(module: str, prefix: str, settings: dict[str, str], log: Path) -> ServiceProcess:
    return ServiceProcess(module, prefix, {"LOG_LEVEL": "WARNING", **settings}, log)


def _wait_for_route(target: str, metadata: list[tuple[str, str]], timeout: float = 60) -> None:
    """Until the gateway's routing table holds the predictor with the bench model's tag."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        admin = gateway_pb2_grpc.GatewayAdminStub(channel)
        while True:
            routes = admin.GetRoutes(gpb.GetRoutesRequest(), metadata=metadata, timeout=10).routes
            upstreams = [u for r in routes if r.service == "predictor" for u in r.upstreams]
            if any(f"model={MODEL}" in u.tags for u in upstreams):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway at {target} never routed to the predictor: {routes}")
            time.sleep(0.2)


def _create_key(target: str) -> str:
    """A PREDICT key with a rate limit far above what the bench sends, made with the bootstrap admin key."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        admin = gateway_pb2_grpc.GatewayAdminStub(channel)
        request = gpb.CreateApiKeyRequest(name="gateway-bench", scopes=[gpb.SCOPE_PREDICT], rate_limit=1e6)
        reply = admin.CreateApiKey(request, metadata=[("authorization", f"Bearer {ADMIN_KEY}")], timeout=10)
        return reply.secret


@contextmanager
def mesh(workdir: Path, model_dir: Path, args) -> Iterator[dict[str, Endpoint]]:
    """Consul, Redis, registry, one predictor and two gateways (auth off; auth on unless --skip-auth) for the duration
    of the block."""
    with ExitStack() as stack:
        consul = stack.enter_context(ConsulAgent(workdir / "consul"))
        redis = stack.enter_context(RedisServer(workdir / "redis"))
        common = {"CONSUL_URL": consul.http_url, "REDIS_URL": redis.url, "CONSUL_CHECK_INTERVAL": "1s"}
        registry = _service(
            "services.registry", "MODELGRID_REGISTRY_", {**common, "BLOB_DIR": str(workdir / "blobs")},
            workdir / "registry.log",
        )  # fmt: skip
        stack.callback(registry.stop)
        registry.start()
        with grpc.insecure_channel(registry.target, options=CHANNEL_OPTIONS) as channel:
            client = RegistryClient(channel, client_id="gateway-bench")
            client.ensure_model(MODEL, "MLP 64-256-256-10")
            client.push_savedmodel(MODEL, model_dir)
        predictor_settings = {
            **common, "REGISTRY_TARGET": registry.target, "MODELS": json.dumps([{"name": MODEL}]),
            "CACHE_DIR": str(workdir / "cache"), "METRICS_PORT": "-1", "BATCHING_ENABLED": "true",
            "TF_THREADS": str(args.tf_threads),
        }  # fmt: skip
        predictor = _service("services.predictor", "MODELGRID_PREDICTOR_", predictor_settings, workdir / "pred.log")
        stack.callback(predictor.stop)
        predictor.start(timeout=180)
        gateway_settings = {**common, "WEB_PORT": "-1", "METRICS_PORT": "-1", "AUTH_ENABLED": "false"}
        gateway = _service("services.gateway", "MODELGRID_GATEWAY_", gateway_settings, workdir / "gateway.log")
        stack.callback(gateway.stop)
        gateway.start()
        _wait_for_route(gateway.target, [])
        pred_pid = predictor.process.pid
        paths = {
            DIRECT: Endpoint(DIRECT, predictor.target, pids={"pred": pred_pid}),
            GATEWAY: Endpoint(GATEWAY, gateway.target, pids={"pred": pred_pid, "gw": gateway.process.pid}),
        }
        if not args.skip_auth:
            auth_settings = {**gateway_settings, "AUTH_ENABLED": "true", "ADMIN_KEY": ADMIN_KEY}
            log = workdir / "gateway-auth.log"
            gateway_auth = _service("services.gateway", "MODELGRID_GATEWAY_", auth_settings, log)
            stack.callback(gateway_auth.stop)
            gateway_auth.start()
            _wait_for_route(gateway_auth.target, [("authorization", f"Bearer {ADMIN_KEY}")])
            secret = _create_key(gateway_auth.target)
            paths[GATEWAY_AUTH] = Endpoint(
                GATEWAY_AUTH, gateway_auth.target, [("authorization", f"Bearer {secret}")],
                {"pred": pred_pid, "gw": gateway_auth.process.pid, "redis": redis.pid},
            )  # fmt: skip
        yield paths


def check_answer(path: Endpoint, x: np.ndarray, expected: np.ndarray) -> None:
    """One request before the load: every path must answer what TensorFlow answers in-process."""
    with grpc.insecure_channel(path.target, options=CHANNEL_OPTIONS) as channel:
        predict = channel.unary_unary(
            PREDICT_METHOD, pb.PredictRequest.SerializeToString, pb.PredictResponse.FromString
        )
        request = pb.PredictRequest(model=common_pb2.ModelRef(name=MODEL), inputs={"x": array_to_tensor(x)})
        y = tensor_to_array(predict(request, metadata=path.metadata, timeout=60).outputs["y"])
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-4, err_msg=f"{path.name} answers differently")


# ---- driving ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One load generator window on one path at one concurrency."""

    path: str
    concurrency: int
    round: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str
    cpu: dict[str, float | None]


def run_cell(path: Endpoint, concurrency: int, round_number: int, args, workdir: Path) -> Run:
    spec = {
        "target": path.target,
        "metadata": path.metadata,
        "payloads": str(workdir / "payloads.pkl"),
        "concurrency": concurrency,
        "warmup": args.warmup,
        "duration": args.duration,
        "pids": path.pids,
    }
    spec_path = workdir / "loadgen.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, __file__, "--loadgen", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=args.warmup + args.duration + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(path.name, concurrency, round_number, **result)


def measure(paths: dict[str, Endpoint], args, workdir: Path, console: Console) -> list[Run]:
    """Every (concurrency, path) cell, round after round; within a round the paths take turns at one concurrency,
    in the reverse order on every other round."""
    runs = []
    for round_number in range(1, args.rounds + 1):
        for concurrency in args.concurrency:
            order = list(paths.values()) if round_number % 2 else list(reversed(paths.values()))
            for path in order:
                run = run_cell(path, concurrency, round_number, args, workdir)
                runs.append(run)
                console.print(
                    f"  round {round_number}/{args.rounds} c={concurrency:<3} {path.name:<12} "
                    f"{run.req_per_s:7,.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                    f"cpu {_cpu_summary(run.cpu)}"
                    + (f"  {run.errors} errors: {run.first_error}" if run.errors else ""),
                    highlight=False,
                )
    return runs


def _cpu_summary(cpu: dict[str, float | None]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in cpu.items() if v is not None)


# ---- profile ---------------------------------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def profile_gateway(path: Endpoint, concurrency: int, args, workdir: Path, console: Console) -> None:
    """One more gateway cell while py-spy samples the gateway; prints its hottest frames."""
    py_spy = py_spy_binary()
    if py_spy is None:
        console.print("--profile: py-spy not found (pip install py-spy into the venv); skipped")
        return
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    out = args.profile_dir / f"gateway-c{concurrency}-{int(time.time())}.txt"
    seconds = round(args.profile_seconds)
    command = [py_spy, "record", "--pid", str(path.pids["gw"]), "--duration", str(seconds), "--rate", "200"]
    command += ["--nonblocking"]  # sample without pausing the gateway, which would slow it down a lot
    sampler = subprocess.Popen(
        [*command, "--format", "raw", "--full-filenames", "--output", str(out), *(["--native"] if args.native else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # py-spy attaches
        run = run_cell(path, concurrency, 0, argparse.Namespace(**{**vars(args), "duration": seconds - 1}), workdir)
    finally:
        try:
            _, stderr = sampler.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            sampler.kill()
            _, stderr = sampler.communicate()
    if sampler.returncode != 0 or not out.is_file():
        console.print(f"--profile: py-spy failed: {stderr.strip()[-500:]}")
        return
    console.print(
        f"\nprofile of {path.name} at c={concurrency} ({run.req_per_s:,.0f} req/s under py-spy, which slows it): {out}"
    )
    print_profile(out, console, args.profile_top)


def print_profile(collapsed: Path, console: Console, top: int) -> None:
    """Self and inclusive shares of samples per function from py-spy's collapsed stacks ("f (file:line);... n"),
    and where the leaf frames are (by package)."""
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
        console.print("the profile is empty")
        return
    table = Table(title=f"gateway CPU samples ({total:,} in all): top functions")
    for header in ("self (in the function itself)", "inclusive (event loop and entry frames left out)"):
        table.add_column(header, no_wrap=True, overflow="ellipsis", ratio=1)
    plumbing = ("asyncio/", "runpy", "threading.py", "selectors.py", "services/gateway/main.py", "__main__.py",
                "_asynciomodule.c")  # fmt: skip
    wrapping = [
        (k, n) for k, n in inclusive.most_common()
        if n < 0.75 * total and not k.startswith("0x") and not any(p in k for p in plumbing)
    ]  # fmt: skip
    selfs, wrapping = own.most_common(top), wrapping[:top]
    for i in range(max(len(selfs), len(wrapping))):
        cells = [f"{n / total:4.0%}  {name}" if i < len(pairs) else "" for pairs in (selfs, wrapping) for name, n in [
            pairs[i] if i < len(pairs) else ("", 0)]]  # fmt: skip
        table.add_row(*cells)
    console.print(table)
    console.print(
        "  leaf frames by package: " + ", ".join(f"{area} {n / total:.0%}" for area, n in areas.most_common())
        + "; deepest frame of the modelgrid code or of OpenTelemetry: "
        + ", ".join(f"{owner} {n / total:.0%}" for owner, n in owners.most_common()),
        highlight=False,
    )  # fmt: skip


PROFILE_AREAS = (
    ("grpc", "grpc/"), ("opentelemetry", "opentelemetry/"), ("gateway", "services/"), ("asyncio", "asyncio/"),
    ("prometheus", "prometheus_client/"), ("redis", "redis/"),
)  # fmt: skip


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


# ---- report ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """The median of one (path, concurrency) cell over the rounds."""

    path: str
    concurrency: int
    runs: list[Run]

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.runs)

    def cpu(self, key: str) -> float | None:
        values = [r.cpu.get(key) for r in self.runs]
        return statistics.median(values) if values and None not in values else None

    def cpu_ms_per_call(self, *keys: str) -> float | None:
        """Median over the rounds of the CPU time these processes spent per completed call."""
        values = []
        for run in self.runs:
            used = [run.cpu.get(k) for k in keys if k in run.cpu]
            if not used or None in used or not run.req_per_s:
                return None
            values.append(sum(used) / run.req_per_s * 1e3)
        return statistics.median(values)


def rows_of(runs: list[Run], paths: list[str], concurrencies: list[int]) -> list[Row]:
    rows = []
    for concurrency in concurrencies:
        for path in paths:
            cell = [r for r in runs if r.path == path and r.concurrency == concurrency]
            if cell:
                rows.append(Row(path, concurrency, sorted(cell, key=lambda r: r.round)))
    return rows


def paired_ratios(row: Row, direct: Row) -> list[float]:
    """Each round's req/s over the direct run of the same round."""
    by_round = {r.round: r.req_per_s for r in direct.runs}
    return [r.req_per_s / by_round[r.round] for r in row.runs if by_round.get(r.round)]


def print_table(console: Console, rows: list[Row], args) -> None:
    direct = {r.concurrency: r for r in rows if r.path == DIRECT}
    table = Table(
        title=f"Predict, single-row MLP requests: median of {args.rounds} rounds of {args.duration:g} s "
        f"(after {args.warmup:g} s warm-up)"
    )
    headers = (
        "path", "c", "req/s", "p50 ms", "p99 ms", "vs direct", "+p50 ms", "gw ms/req", "all ms/req",
        "cpu pred", "gw", "redis", "cli", "other", "runs req/s (ratio)", "err",
    )  # fmt: skip
    for header in headers:
        table.add_column(header, justify="left" if header in ("path", "err", "runs req/s (ratio)") else "right")
    previous = None
    for row in rows:
        if previous is not None and row.concurrency != previous:
            table.add_section()
        previous = row.concurrency
        base = direct.get(row.concurrency)
        through = row.path != DIRECT and base is not None
        rate = row.median("req_per_s")
        ratios = paired_ratios(row, base) if through else []
        runs = "/".join(f"{r.req_per_s:,.0f}" for r in row.runs)
        if ratios:
            runs += " (" + "/".join(f"{x:.2f}" for x in ratios) + ")"
        errors = sum(r.errors for r in row.runs)
        table.add_row(
            row.path,
            str(row.concurrency),
            f"{rate:,.0f}",
            fmt(row.median("p50_ms")),
            fmt(row.median("p99_ms")),
            fmt(rate / base.median("req_per_s"), ".2f", "x") if through else "",
            fmt(row.median("p50_ms") - base.median("p50_ms"), "+.2f") if through else "",
            fmt(row.cpu_ms_per_call("gw"), ".3f"),
            fmt(row.cpu_ms_per_call(*PATH_PROCESSES), ".3f"),
            fmt(row.cpu("pred")),
            fmt(row.cpu("gw")),
            fmt(row.cpu("redis")),
            fmt(row.cpu("cli")),
            fmt(row.cpu("other")),
            runs,
            f"{errors} {next((r.first_error for r in row.runs if r.errors), '')[:50]}" if errors else "",
        )
    console.print(table)


def target_check(rows: list[Row]) -> tuple[str, bool | None]:
    by = {(r.path, r.concurrency): r for r in rows}
    gateway, direct = by.get((GATEWAY, TARGET_CONCURRENCY)), by.get((DIRECT, TARGET_CONCURRENCY))
    if gateway is None or direct is None:
        return f"n/a   c={TARGET_CONCURRENCY} was not measured", None
    ratio = gateway.median("req_per_s") / direct.median("req_per_s")
    added = gateway.median("p50_ms") - direct.median("p50_ms")
    passed = ratio >= TARGET_RATIO
    line = (
        f"{'PASS' if passed else 'MISS'}  c={TARGET_CONCURRENCY}: gateway {gateway.median('req_per_s'):,.0f} req/s / "
        f"direct {direct.median('req_per_s'):,.0f} req/s = {ratio:.2f}x, costs {1 - ratio:.0%} of throughput "
        f"(target: at most {1 - TARGET_RATIO:.0%}); adds {added:+.2f} ms at p50"
    )
    direct_ms, gateway_ms = direct.cpu_ms_per_call(*PATH_PROCESSES), gateway.cpu_ms_per_call(*PATH_PROCESSES)
    gw_ms = gateway.cpu_ms_per_call("gw")
    if direct_ms and gateway_ms and gw_ms is not None:
        line += (
            f"\n      CPU per call: direct path {direct_ms:.3f} ms (predictor + load generator), through the gateway "
            f"{gateway_ms:.3f} ms, of which the gateway {gw_ms:.3f} ms: with the same CPU for both paths (a saturated "
            f"machine) the ratio would be {direct_ms / gateway_ms:.2f}x; {TARGET_RATIO:.2f}x needs a path at <= "
            f"{direct_ms / TARGET_RATIO:.3f} ms per call: the gateway at <= {direct_ms * (1 / TARGET_RATIO - 1):.3f} "
            "ms if the rest of the path stayed as cheap as direct"
        )
    return line, passed


# ---- main ------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rows report the median")
    parser.add_argument("--concurrency", default="32,8,128", help="comma-separated requests in flight")
    parser.add_argument("--skip-auth", action="store_true", help="leave out the gateway with auth on")
    parser.add_argument("--tf-threads", type=int, default=2, help="predictor TensorFlow intra/inter-op threads")
    parser.add_argument("--quick", action="store_true", help="c=32 only, 2 rounds of 2 s cells: about 1.5 minutes")
    parser.add_argument("--profile", action="store_true", help="profile the gateway with py-spy after measuring")
    parser.add_argument("--native", action="store_true", help="with --profile: native frames too (py-spy --native)")
    parser.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "gateway-bench-profiles")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="with --profile: sampled seconds")
    parser.add_argument("--profile-top", type=int, default=25, help="with --profile: functions listed")
    parser.add_argument("--tmp-root", type=Path, default=Path(tempfile.gettempdir()), help="parent of the work dir")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.concurrency = 2.0, 1.0, 2, str(TARGET_CONCURRENCY)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, here and in the children
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    args = parse_args(argv)
    if args.loadgen:
        return loadgen_main(args.loadgen)
    if args.build_model:
        return build_model_main(args.build_model)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 170)  # piped into a log: rich would otherwise squeeze to 80 columns
    workdir = Path(tempfile.mkdtemp(prefix="modelgrid-gateway-bench-", dir=args.tmp_root))
    started = time.monotonic()
    try:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(
            f"work dir {workdir}; {os.cpu_count()} CPUs, load average {load:.1f} at start; {args.rounds} rounds of "
            f"{args.warmup:g} s warm-up + {args.duration:g} s per cell; concurrency {args.concurrency}"
        )
        rng = np.random.default_rng(4)
        rows = [rng.random((1, 64), dtype=np.float32) for _ in range(PAYLOADS)]
        model = common_pb2.ModelRef(name=MODEL)
        bodies = [pb.PredictRequest(model=model, inputs={"x": array_to_tensor(x)}).SerializeToString() for x in rows]
        (workdir / "payloads.pkl").write_bytes(pickle.dumps(bodies))
        model_dir, expected = build_model(workdir, rows[0])
        with mesh(workdir, model_dir, args) as paths:
            for path in paths.values():
                check_answer(path, rows[0], expected)
            console.print(f"  mesh up and answering on {len(paths)} paths after {time.monotonic() - started:.0f} s")
            runs = measure(paths, args, workdir, console)
            results = rows_of(runs, list(paths), args.concurrency)
            console.print()
            print_table(console, results, args)
            line, passed = target_check(results)
            if args.profile:
                profile_gateway(paths[GATEWAY], args.concurrency[0], args, workdir, console)
        console.print(
            "  vs direct: median req/s over direct's at the same c; +p50 ms: added median latency; runs: each round's "
            "req/s (and its ratio to the same round's direct run); gw ms/req: the gateway's CPU time per call, all "
            "ms/req: that of every process on the path; cpu in cores (2.0 = both); predictor: batching on with its "
            f"default MAX_BATCH_SIZE and MAX_QUEUE_DELAY_MS, TF threads {args.tf_threads}"
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(f"  load average {load:.1f} at the end on {os.cpu_count()} CPUs (the bench itself adds ~2)")
        console.print(line, highlight=False)
        if passed is False and not args.profile:
            console.print("  (--profile shows where the gateway spends its CPU)")
        console.print(f"total {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
