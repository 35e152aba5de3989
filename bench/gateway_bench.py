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

--profile runs one more gateway cell at the first concurrency under `py-spy record` (`make bench-gateway` installs
it into the venv; not a dependency of the services) and prints the gateway's hottest Python functions; the raw
profile stays in --profile-dir.
--profile-path gateway+auth samples the gateway with auth on instead.
"""

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from harness import (
    CHANNEL_OPTIONS,
    Load,
    LoadResult,
    Mesh,
    build_mlp_in_child,
    check_predict,
    console,
    fmt,
    load_average,
    predict_payloads,
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

MODEL = "bench-gw-mlp"
PAYLOADS = 16  # distinct single-row inputs cycled by the load generator
CALL_TIMEOUT_S = 30.0
ADMIN_KEY = "gateway-bench-admin"
DIRECT, GATEWAY, GATEWAY_AUTH = "direct", "gateway", "gateway+auth"
TARGET_CONCURRENCY, TARGET_RATIO = 32, 0.85
PATH_PROCESSES = ("pred", "gw", "redis", "cli")  # the processes a call's CPU time is spent in


# ---- the mesh ------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach the predictor: the target the load generator calls, with what it sends and watches."""

    name: str
    target: str
    metadata: list[tuple[str, str]] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    """Processes whose CPU use is reported: "pred", and through a gateway "gw" (with auth on also "redis")."""


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
    with Mesh(workdir, LOG_LEVEL="WARNING", CONSUL_CHECK_INTERVAL="1s") as services:
        registry = services.registry()
        push_models(registry.target, {MODEL: (model_dir, "MLP 64-256-256-10")}, "gateway-bench")
        predictor = services.start(
            "predictor",
            timeout=180,
            REGISTRY_TARGET=registry.target,
            MODELS=f'[{{"name": "{MODEL}"}}]',
            CACHE_DIR=str(workdir / "cache"),
            METRICS_PORT="-1",
            BATCHING_ENABLED="true",
            TF_THREADS=str(args.tf_threads),
        )
        gateway_settings = {"WEB_PORT": "-1", "METRICS_PORT": "-1", "AUTH_ENABLED": "false"}
        gateway = services.start("gateway", **gateway_settings)
        _wait_for_route(gateway.target, [])
        pred = {"pred": predictor.process.pid}
        paths = {
            DIRECT: Endpoint(DIRECT, predictor.target, pids=pred),
            GATEWAY: Endpoint(GATEWAY, gateway.target, pids={**pred, "gw": gateway.process.pid}),
        }
        if not args.skip_auth:
            auth_settings = {**gateway_settings, "AUTH_ENABLED": "true", "ADMIN_KEY": ADMIN_KEY}
            gateway_auth = services.start("gateway", "gateway-auth", **auth_settings)
            _wait_for_route(gateway_auth.target, [("authorization", f"Bearer {ADMIN_KEY}")])
            secret = _create_key(gateway_auth.target)
            pids = {**pred, "gw": gateway_auth.process.pid, "redis": services.redis.pid}
            paths[GATEWAY_AUTH] = Endpoint(
                GATEWAY_AUTH, gateway_auth.target, [("authorization", f"Bearer {secret}")], pids
            )
        yield paths


# ---- driving ---------------------------------------------------------------------------------------------------------


@dataclass
class Run(LoadResult):
    """One load generator window on one path at one concurrency."""

    path: str
    concurrency: int
    round: int


def run_cell(path: Endpoint, concurrency: int, round_number: int, args, workdir: Path) -> Run:
    payloads = workdir / "payloads.pkl"
    load = Load(
        path.target, payloads, concurrency, args.warmup, args.duration, path.pids, path.metadata, CALL_TIMEOUT_S
    )
    return Run(**asdict(run_load(load, workdir)), path=path.name, concurrency=concurrency, round=round_number)


def measure(paths: dict[str, Endpoint], args, workdir: Path, out: Console) -> list[Run]:
    """Every (concurrency, path) cell, round after round; within a round the paths take turns at one concurrency,
    in the reverse order on every other round."""
    runs = []
    for round_number in range(1, args.rounds + 1):
        for concurrency in args.concurrency:
            order = list(paths.values()) if round_number % 2 else list(reversed(paths.values()))
            for path in order:
                run = run_cell(path, concurrency, round_number, args, workdir)
                runs.append(run)
                cpu = " ".join(f"{k} {v:.2f}" for k, v in run.cpu.items() if v is not None)
                out.print(
                    f"  round {round_number}/{args.rounds} c={concurrency:<3} {path.name:<12} "
                    f"{run.calls_per_s:7,.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  cpu {cpu}"
                    + (f"  {run.errors} errors: {run.first_error}" if run.errors else ""),
                    highlight=False,
                )
    return runs


def profile_gateway(path: Endpoint, concurrency: int, args, workdir: Path, out: Console) -> None:
    """One more gateway cell while py-spy samples the gateway; prints its hottest frames."""

    def run(seconds: float) -> Run:
        return run_cell(path, concurrency, 0, argparse.Namespace(**{**vars(args), "duration": seconds}), workdir)

    what = f"{path.name} at c={concurrency}"
    profile_cell(path.pids["gw"], run, what, args, out, entry="services/gateway/main.py")


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
            if not used or None in used or not run.calls_per_s:
                return None
            values.append(sum(used) / run.calls_per_s * 1e3)
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
    by_round = {r.round: r.calls_per_s for r in direct.runs}
    return [r.calls_per_s / by_round[r.round] for r in row.runs if by_round.get(r.round)]


HEADERS = ("path", "c", "req/s", "p50 ms", "p99 ms", "vs direct", "+p50 ms", "gw ms/req", "all ms/req", "cpu pred")
HEADERS += ("gw", "redis", "cli", "other", "runs req/s (ratio)", "err")


def print_table(out: Console, rows: list[Row], args) -> None:
    direct = {r.concurrency: r for r in rows if r.path == DIRECT}
    title = (
        f"Predict, single-row MLP requests: median of {args.rounds} rounds of {args.duration:g} s "
        f"(after {args.warmup:g} s warm-up)"
    )
    result = table(title, HEADERS, left=("path", "err", "runs req/s (ratio)"), no_wrap=False)
    previous = None
    for row in rows:
        if previous is not None and row.concurrency != previous:
            result.add_section()
        previous = row.concurrency
        base = direct.get(row.concurrency)
        through = row.path != DIRECT and base is not None
        rate = row.median("calls_per_s")
        ratios = paired_ratios(row, base) if through else []
        runs = "/".join(f"{r.calls_per_s:,.0f}" for r in row.runs)
        if ratios:
            runs += " (" + "/".join(f"{x:.2f}" for x in ratios) + ")"
        errors = sum(r.errors for r in row.runs)
        result.add_row(
            row.path,
            str(row.concurrency),
            f"{rate:,.0f}",
            fmt(row.median("p50_ms")),
            fmt(row.median("p99_ms")),
            fmt(rate / base.median("calls_per_s"), ".2f", "x") if through else "",
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
    out.print(result)


def target_check(rows: list[Row]) -> tuple[str, bool | None]:
    by = {(r.path, r.concurrency): r for r in rows}
    gateway, direct = by.get((GATEWAY, TARGET_CONCURRENCY)), by.get((DIRECT, TARGET_CONCURRENCY))
    if gateway is None or direct is None:
        return f"n/a   c={TARGET_CONCURRENCY} was not measured", None
    ratio = gateway.median("calls_per_s") / direct.median("calls_per_s")
    added = gateway.median("p50_ms") - direct.median("p50_ms")
    passed = ratio >= TARGET_RATIO
    line = (
        f"{'PASS' if passed else 'MISS'}  c={TARGET_CONCURRENCY}: gateway {gateway.median('calls_per_s'):,.0f} req/s / "
        f"direct {direct.median('calls_per_s'):,.0f} req/s = {ratio:.2f}x, costs {1 - ratio:.0%} of throughput "
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
    profile_args(parser, "the gateway")
    parser.add_argument(
        "--profile-path", choices=(GATEWAY, GATEWAY_AUTH), default=GATEWAY, help="with --profile: the gateway sampled"
    )
    tmp_root_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.concurrency = 2.0, 1.0, 2, str(TARGET_CONCURRENCY)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, here and in the children
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    args = parse_args(argv)
    out = console(170)
    started = time.monotonic()
    with work_dir("modelgrid-gateway-bench-", args.tmp_root) as workdir:
        out.print(
            f"work dir {workdir}; {os.cpu_count()} CPUs, load average {load_average():.1f} at start; {args.rounds} "
            f"rounds of {args.warmup:g} s warm-up + {args.duration:g} s per cell; concurrency {args.concurrency}"
        )
        rng = np.random.default_rng(4)
        rows = [rng.random((1, 64), dtype=np.float32) for _ in range(PAYLOADS)]
        write_payloads(workdir / "payloads.pkl", predict_payloads(MODEL, rows))
        expected = build_mlp_in_child(workdir / "model", rows[0])
        with mesh(workdir, workdir / "model", args) as paths:
            for path in paths.values():
                check_predict(path.target, MODEL, rows[0], expected, path.name, path.metadata)
            out.print(f"  mesh up and answering on {len(paths)} paths after {time.monotonic() - started:.0f} s")
            results = rows_of(measure(paths, args, workdir, out), list(paths), args.concurrency)
            out.print()
            print_table(out, results, args)
            line, passed = target_check(results)
            if args.profile:
                profile_gateway(paths[args.profile_path], args.concurrency[0], args, workdir, out)
    out.print(
        "  vs direct: median req/s over direct's at the same c; +p50 ms: added median latency; runs: each round's "
        "req/s (and its ratio to the same round's direct run); gw ms/req: the gateway's CPU time per call, all "
        "ms/req: that of every process on the path; cpu in cores (2.0 = both); predictor: batching on with its "
        f"default MAX_BATCH_SIZE and MAX_QUEUE_DELAY_MS, TF threads {args.tf_threads}"
    )
    out.print(f"  load average {load_average():.1f} at the end on {os.cpu_count()} CPUs (the bench itself adds ~2)")
    out.print(line, highlight=False)
    if passed is False and not args.profile:
        out.print("  (--profile shows where the gateway spends its CPU)")
    out.print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
