"""Predictor throughput and latency against the model called in-process and a plain Flask + TensorFlow server.

What one run does (`make bench-predictor`, about 6 minutes on 2 cores; --quick about 1.5):

* builds two real SavedModels with a `serving_default` signature (input "x", output "y"):
    mlp  64 -> 256 -> 256 -> 10 dense layers, float32[-1, 64]: model time is tiny, the serving path dominates;
    cnn  six 3x3 convolutions (96-96-192-192-384-384 channels, two max-pools), global average pool and a dense
         layer, float32[-1, 32, 32, 3]: a few ms per image, model time dominates;
* in-process limit, before any server starts: loads each SavedModel in this process and calls its signature the
  way the predictor's runner does (numpy -> tensor -> signature -> numpy) at batch sizes 1, 8, 32, 64 and 128,
  taking turns over three rounds; rows/s = batch / median call time. The best batch size is the ceiling
  ("limit") every served variant is compared with; it is probed again in every round (servers idle);
* starts its own Consul dev agent, Redis server and registry on free loopback ports and pushes both models;
* starts the three servers under test, each serving both models:
    predictor batching off  `python -m services.predictor`, every request executed alone;
    predictor batching on   the same with dynamic batching (--max-batch-size rows, --queue-delay-ms);
    flask                   the server most tutorials show: Flask's built-in threaded server, a JSON body
                            {"x": [[...]]} -> np.array -> signature -> {"y": [[...]]}; request logging off;
* per model, concurrency c (1, 8, 32, 128) and server: a load generator in a separate process runs c coroutines
  in a closed loop, each sending single-row requests (the online case) over one gRPC channel (pre-serialized
  PredictRequest bytes, responses not parsed) or, for Flask, over one keep-alive HTTP/1.1 connection each
  (pre-built request bytes). After --warmup seconds it measures for --duration seconds: throughput counts the
  requests that completed inside the window, p50/p99 are their latencies. Cells are interleaved (the three
  servers one after the other at the same model and concurrency, then the next; --rounds times over): only one
  server has load at a time (the idle ones use next to no CPU) and noise from other tenants of the machine
  hits every variant alike. Each cell, and the limit, reports its best round: on a shared machine noise only
  ever slows a run down (other tenants take CPU; nothing makes a run faster), so the best of a few rounds is the
  closest to what the code can do, for the same reason `timeit` takes the minimum.

Fairness: every TensorFlow runs with intra- and inter-op threads set to --tf-threads (default 2, the core count):
this process for the limit, the predictor (MODELGRID_PREDICTOR_TF_THREADS) and the Flask server. The load
generator shares the 2 cores with the server under test, the same way for every variant. CPU use is reported in
cores (2.0 is the whole machine): "srv" the server under test (all its threads), "cli" the load generator,
"other" everything else on the machine during the window (idle servers, neighbours).

How to read it: "vs off" is a row's rows/s over the predictor with batching off at the same concurrency; "eff"
is its rows/s over the model's in-process limit. "batch" and "exec ms" come from the predictor's own metrics
(mean rows per model execution and mean execution time, warm-up included). "runs" lists every round's rows/s:
their spread is the noise. Quote ratios measured in the same run, not absolute numbers. The targets: with
batching the predictor serves >= 5x its unbatched throughput on the MLP at c=32, and its best CNN throughput is
>= 60% of the limit.
"""

import argparse
import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from harness import (
    NO_PROXY,
    Load,
    Mesh,
    build_mlp,
    check_predict,
    console,
    fmt,
    http_ok,
    machine_busy_seconds,
    milliseconds,
    percentile,
    predict_payloads,
    push_models,
    run_load,
    table,
    tmp_root_arg,
    work_dir,
    write_payloads,
)
from harness import (
    build_cnn as harness_build_cnn,
)
from rich.console import Console

from services.kit.localinfra import free_port

LIMIT_BATCH_SIZES = (1, 8, 32, 64, 128)
PAYLOADS_PER_MODEL = 16  # distinct inputs cycled by the load generator
OFF, ON, FLASK, LIMIT = "predictor, batching off", "predictor, batching on", "flask", "in-process"


# ---- models --------------------------------------------------------------------------------------------------


def build_cnn(directory: Path) -> None:
    """Six 3x3 convolutions with ReLU (max-pool after every second), global average pool, dense to 10."""
    harness_build_cnn(directory, widths=(96, 96, 192, 192, 384, 384), pool_after=(1, 3))


@dataclass(frozen=True)
class ModelSpec:
    key: str
    description: str
    row_shape: tuple[int, ...]
    build: Callable[[Path], None]

    @property
    def registry_name(self) -> str:
        return f"bench-{self.key}"


MODELS = {
    "mlp": ModelSpec("mlp", "MLP 64-256-256-10", (64,), build_mlp),
    "cnn": ModelSpec("cnn", "CNN 6x conv3x3 96..384 ch", (32, 32, 3), build_cnn),
}


def configure_tensorflow(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def load_signature(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The serving signature as the predictor's runner calls it: numpy in, tensor, signature, numpy out."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["serving_default"]
    return lambda x, _keep=loaded: fn(x=tf.convert_to_tensor(x))["y"].numpy()


# ---- results -------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One measured configuration: a variant at one concurrency (or, in-process, one batch size)."""

    variant: str
    concurrency: int
    rows_per_call: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    server_cpu: float | None = None
    client_cpu: float | None = None
    other_cpu: float | None = None
    batch_rows: float | None = None
    exec_ms: float | None = None
    note: str = ""
    runs: list[float] = field(default_factory=list)
    """rows/s of every round, when the cell is the best of several."""

    @property
    def rows_per_s(self) -> float:
        return self.calls_per_s * self.rows_per_call


@dataclass
class CallStats:
    """Per-call latencies of in-process calls and the CPU used meanwhile."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    own_cpu_s: float = 0.0
    machine_cpu_s: float | None = 0.0

    def time_calls(self, call: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> None:
        cpu0, machine0, start = time.process_time(), machine_busy_seconds(), time.perf_counter()
        calls = 0
        while time.perf_counter() - start < seconds or calls < 2:
            t = time.perf_counter()
            call(x)
            self.latencies.append(time.perf_counter() - t)
            calls += 1
        self.wall_s += time.perf_counter() - start
        self.own_cpu_s += time.process_time() - cpu0
        machine1 = machine_busy_seconds()
        if self.machine_cpu_s is None or machine0 is None or machine1 is None:
            self.machine_cpu_s = None
        else:
            self.machine_cpu_s += machine1 - machine0

    def cell(self, batch: int) -> Cell:
        """rows/s = batch / median call time, so a stall from a neighbour on the machine does not lower it."""
        values = sorted(self.latencies)
        p50, own = percentile(values, 50), self.own_cpu_s / self.wall_s
        other = None if self.machine_cpu_s is None else max(0.0, self.machine_cpu_s / self.wall_s - own)
        return Cell(LIMIT, 0, batch, 1 / p50, p50 * 1e3, percentile(values, 99) * 1e3, server_cpu=own, other_cpu=other)


def measure_limit(spec: ModelSpec, call: Callable[[np.ndarray], np.ndarray], seconds: float) -> list[Cell]:
    """The signature in this process at each batch size; batch sizes take turns over three rounds of `seconds` in
    all, so noise hits them alike."""
    rng = np.random.default_rng(3)
    inputs = {batch: rng.random((batch, *spec.row_shape), dtype=np.float32) for batch in LIMIT_BATCH_SIZES}
    stats = {batch: CallStats() for batch in LIMIT_BATCH_SIZES}
    for x in inputs.values():
        for _ in range(3):  # first calls at a new shape build and cache kernels
            call(x)
    for _ in range(3):
        for batch, x in inputs.items():
            stats[batch].time_calls(call, x, seconds / 3)
    return [stats[batch].cell(batch) for batch in LIMIT_BATCH_SIZES]


def best_cell(cells: list[Cell]) -> Cell:
    """The round with the best throughput (its latencies and CPU use with it), listing every round's rows/s."""
    chosen = replace(max(cells, key=lambda c: c.rows_per_s))
    chosen.runs = [c.rows_per_s for c in cells]
    chosen.errors = sum(c.errors for c in cells)
    chosen.note = next((c.note for c in cells if c.note), "")
    return chosen


# ---- the servers -------------------------------------------------------------------------------------------------


def flask_main(spec_path: str) -> None:
    """A tutorial-style Flask app: JSON in, model, JSON out, on Flask's built-in threaded server (runs in its own
    process: `predictor_bench.py --serve-flask SPEC`)."""
    import logging

    import tensorflow as tf
    from flask import Flask, jsonify, request

    spec = json.loads(Path(spec_path).read_text())
    configure_tensorflow(spec["tf_threads"])
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
    models = {name: tf.saved_model.load(path) for name, path in spec["models"].items()}
    app = Flask("flask-baseline")

    @app.post("/predict/<name>")
    def predict(name: str):
        x = np.array(request.get_json()["x"], dtype=np.float32)
        y = models[name].signatures["serving_default"](x=tf.constant(x))["y"].numpy()
        return jsonify({"y": y.tolist()})

    @app.get("/healthz")
    def healthz():
        return "ok"

    app.run(host="127.0.0.1", port=spec["port"], threaded=True)


@dataclass
class Server:
    target: str
    pid: int
    metrics_url: str = ""


def predictor_server(mesh: Mesh, registry: str, specs: list[ModelSpec], label: str, settings: dict) -> Server:
    metrics_port = free_port()
    predictor = mesh.start(
        "predictor",
        f"predictor-{label}",
        timeout=180,
        REGISTRY_TARGET=registry,
        MODELS=json.dumps([{"name": s.registry_name} for s in specs]),
        CACHE_DIR=str(mesh.workdir / f"cache-{label}"),
        METRICS_PORT=str(metrics_port),
        **settings,
    )
    return Server(predictor.target, predictor.process.pid, f"http://127.0.0.1:{metrics_port}/metrics")


def flask_server(mesh: Mesh, models: dict[str, Path], threads: int) -> Server:
    port = free_port()
    spec_path = mesh.workdir / "flask.json"
    spec_path.write_text(
        json.dumps({"port": port, "tf_threads": threads, "models": {k: str(v) for k, v in models.items()}})
    )
    argv = [sys.executable, __file__, "--serve-flask", str(spec_path)]
    pid = mesh.process("flask", argv, lambda: http_ok(f"http://127.0.0.1:{port}/healthz"))
    return Server(f"127.0.0.1:{port}", pid)


def batch_metrics(url: str, model: str) -> dict[str, float]:
    """Sums and counts of the predictor's batch histograms for one model (all versions)."""
    text = NO_PROXY.open(url, timeout=5).read().decode()
    values: dict[str, float] = {}
    pattern = re.compile(r"^modelgrid_predictor_(batch_rows|execution_seconds)_(sum|count)\{([^}]*)\} (\S+)$", re.M)
    for name, kind, labels, value in pattern.findall(text):
        if f'model="{model}"' in labels:
            values[f"{name}_{kind}"] = values.get(f"{name}_{kind}", 0.0) + float(value)
    return values


# ---- driving -----------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What the load generator sends for one model: payload files per protocol and a reference answer."""

    spec: ModelSpec
    grpc_payloads: Path
    http_payloads: Path
    sample: np.ndarray
    expected: np.ndarray
    call: Callable[[np.ndarray], np.ndarray]
    cells: list[Cell] = field(default_factory=list)
    limit_runs: list[Cell] = field(default_factory=list)
    """The in-process limit at the best batch size: the scan's value, then one probe per round."""

    def probe_limit(self, seconds: float) -> Cell:
        batch = self.limit_runs[0].rows_per_call
        x = np.random.default_rng(5).random((batch, *self.spec.row_shape), dtype=np.float32)
        stats = CallStats()
        stats.time_calls(self.call, x, seconds)
        self.limit_runs.append(stats.cell(batch))
        return self.limit_runs[-1]

    @property
    def limit(self) -> Cell:
        return best_cell(self.limit_runs)


def make_workload(spec: ModelSpec, workdir: Path, call: Callable[[np.ndarray], np.ndarray]) -> Workload:
    rng = np.random.default_rng(4)
    rows = [rng.random((1, *spec.row_shape), dtype=np.float32) for _ in range(PAYLOADS_PER_MODEL)]
    grpc_path = write_payloads(workdir / f"{spec.key}-grpc.pkl", predict_payloads(spec.registry_name, rows))
    http_bodies = [json.dumps({"x": np.round(x, 4).tolist()}).encode() for x in rows]
    http_path = write_payloads(workdir / f"{spec.key}-http.pkl", http_bodies)
    return Workload(spec, grpc_path, http_path, rows[0], call(rows[0]), call)


def check_answers(variant: str, server: Server, work: Workload) -> None:
    """One request before the load: the server must answer what TensorFlow answers in-process."""
    if variant != FLASK:
        return check_predict(server.target, work.spec.registry_name, work.sample, work.expected, variant)
    body = json.dumps({"x": work.sample.tolist()}).encode()
    url = f"http://{server.target}/predict/{work.spec.key}"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    reply = NO_PROXY.open(request, timeout=60).read()
    y = np.array(json.loads(reply)["y"], dtype=np.float32)
    np.testing.assert_allclose(y, work.expected, rtol=1e-3, atol=1e-4, err_msg=f"{variant} answers differently")


def run_cell(variant: str, server: Server, work: Workload, concurrency: int, args, workdir: Path) -> Cell:
    flask = variant == FLASK
    load = Load(
        server.target,
        work.http_payloads if flask else work.grpc_payloads,
        concurrency,
        args.warmup,
        args.duration,
        pids={"srv": server.pid},
        http_path=f"/predict/{work.spec.key}" if flask else "",
    )
    before = batch_metrics(server.metrics_url, work.spec.registry_name) if server.metrics_url else {}
    result = run_load(load, workdir)
    cpu = result.cpu
    cell = Cell(
        variant,
        concurrency,
        1,
        result.calls_per_s,
        result.p50_ms,
        result.p99_ms,
        result.errors,
        cpu["srv"],
        cpu["cli"],
        cpu["other"] if cpu["srv"] is not None else None,
        note=result.first_error[:60],
    )
    if server.metrics_url:
        after = batch_metrics(server.metrics_url, work.spec.registry_name)
        batches = after.get("batch_rows_count", 0) - before.get("batch_rows_count", 0)
        if batches:
            cell.batch_rows = (after["batch_rows_sum"] - before.get("batch_rows_sum", 0)) / batches
            exec_s = after["execution_seconds_sum"] - before.get("execution_seconds_sum", 0)
            cell.exec_ms = exec_s / batches * 1e3
    return cell


def measure_served(servers: dict[str, Server], works: list[Workload], args, workdir: Path, out: Console) -> None:
    """Every (model, concurrency) cell of every server, interleaved: round after round, and within a round the
    variants one after the other at the same concurrency, so a noisy neighbour hits them alike."""
    for variant, server in servers.items():
        for work in works:
            check_answers(variant, server, work)
    samples: dict[tuple[str, str, int], list[Cell]] = {}
    for round_number in range(1, args.rounds + 1):
        for work in works:
            probe = work.probe_limit(args.limit_seconds * 2 / 3)  # the servers are idle meanwhile
            out.print(
                f"  round {round_number}/{args.rounds} {work.spec.key} in-process limit probe: "
                f"{probe.rows_per_s:,.0f} rows/s at batch {probe.rows_per_call}",
                highlight=False,
            )
            for concurrency in args.concurrency:
                for variant, server in servers.items():
                    cell = run_cell(variant, server, work, concurrency, args, workdir)
                    samples.setdefault((work.spec.key, variant, concurrency), []).append(cell)
                    out.print(
                        f"  round {round_number}/{args.rounds} {work.spec.key} {variant} c={concurrency}: "
                        f"{cell.rows_per_s:,.0f} rows/s, p50 {cell.p50_ms:.1f} ms, p99 {cell.p99_ms:.1f} ms"
                        + (f", {cell.errors} errors" if cell.errors else ""),
                        highlight=False,
                    )
    for work in works:
        for variant in servers:
            for concurrency in args.concurrency:
                work.cells.append(best_cell(samples[(work.spec.key, variant, concurrency)]))


# ---- report --------------------------------------------------------------------------------------------------------

HEADERS = ("variant", "c/b", "req/s", "rows/s", "p50 ms", "p99 ms", "vs off", "eff", "batch", "exec ms")
HEADERS += ("cpu srv", "cli", "other", "runs", "err")


def compact(value: float) -> str:
    return f"{value / 1000:.0f}k" if value >= 10_000 else f"{value:.0f}"


def print_model_table(out: Console, work: Workload) -> None:
    off = {c.concurrency: c for c in work.cells if c.variant == OFF}
    limit = replace(work.limit, variant="limit *")
    title = (
        f"{work.spec.description}: single-row requests; limit {limit.rows_per_s:,.0f} rows/s "
        f"in-process at batch {limit.rows_per_call}"
    )
    result = table(title, HEADERS, left=("variant", "err"))
    previous = None
    scan = [c for c in work.cells if c.variant == LIMIT]
    for cell in [*scan, limit, *(c for c in work.cells if c.variant != LIMIT)]:
        if previous is not None and cell.variant != previous and cell is not limit:
            result.add_section()
        previous = cell.variant
        base = off.get(cell.concurrency)
        ratio = cell.rows_per_s / base.rows_per_s if base and cell.variant in (ON, FLASK) and base.rows_per_s else None
        result.add_row(
            cell.variant,
            f"b={cell.rows_per_call}" if cell.variant in (LIMIT, limit.variant) else f"c={cell.concurrency}",
            f"{cell.calls_per_s:,.0f}",
            f"{cell.rows_per_s:,.0f}",
            milliseconds(cell.p50_ms),
            milliseconds(cell.p99_ms),
            fmt(ratio, ".2f", "x"),
            fmt(cell.rows_per_s / limit.rows_per_s * 100, ".0f", "%"),
            fmt(cell.batch_rows, ".1f"),
            fmt(cell.exec_ms, ".2f"),
            fmt(cell.server_cpu, ".2f"),
            fmt(cell.client_cpu, ".2f"),
            fmt(cell.other_cpu, ".2f"),
            "/".join(compact(r) for r in cell.runs) if len(cell.runs) > 1 else "",
            f"{cell.errors} {cell.note}" if cell.errors else "",
        )
    out.print(result)


def noise_warning(works: dict[str, Workload]) -> str:
    """A warning when other tenants of the machine used a noticeable share of the CPU during the measurements."""
    measured = [c for w in works.values() for c in [*w.cells, *w.limit_runs] if c.other_cpu is not None]
    if not measured:
        return ""
    mean = sum(c.other_cpu for c in measured) / len(measured)
    if mean < 0.25:
        return ""
    return (
        f"WARNING: other processes used {mean:.2f} of {os.cpu_count()} cores on average while this ran "
        f"(column 'other'); absolute numbers, efficiencies and even ratios are unreliable: rerun on a quiet machine"
    )


def target_checks(works: dict[str, Workload]) -> list[str]:
    lines = []
    if "mlp" in works:
        by = {(c.variant, c.concurrency): c for c in works["mlp"].cells}
        on, off = by.get((ON, 32)), by.get((OFF, 32))
        if on and off and off.rows_per_s:
            ratio = on.rows_per_s / off.rows_per_s
            lines.append(
                f"{'PASS' if ratio >= 5 else 'MISS'}  MLP c=32: batching on {on.rows_per_s:,.0f} rows/s / "
                f"off {off.rows_per_s:,.0f} rows/s = {ratio:.2f}x (target >= 5x)"
            )
        else:
            lines.append("n/a   MLP c=32 batching on/off: concurrency 32 was not measured")
    if "cnn" in works:
        served = [c for c in works["cnn"].cells if c.variant in (ON, OFF)]
        if served:
            best, limit = max(served, key=lambda c: c.rows_per_s), works["cnn"].limit
            share = best.rows_per_s / limit.rows_per_s
            lines.append(
                f"{'PASS' if share >= 0.6 else 'MISS'}  CNN best served: {best.variant} c={best.concurrency} "
                f"{best.rows_per_s:,.0f} rows/s / limit {limit.rows_per_s:,.0f} rows/s (batch "
                f"{limit.rows_per_call}) = {share:.0%} (target >= 60%)"
            )
    return lines


# ---- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell reports its best")
    parser.add_argument("--concurrency", default="1,8,32,128", help="comma-separated requests in flight")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of: mlp, cnn")
    parser.add_argument("--max-batch-size", type=int, default=64, help="predictor MAX_BATCH_SIZE with batching on")
    parser.add_argument("--queue-delay-ms", type=float, default=0.0, help="MAX_QUEUE_DELAY_MS, batching on")
    parser.add_argument("--tf-threads", type=int, default=2, help="TF intra- and inter-op threads everywhere")
    parser.add_argument("--limit-seconds", type=float, default=1.5, help="seconds per in-process batch size")
    parser.add_argument("--skip-flask", action="store_true", help="leave out the Flask baseline")
    parser.add_argument("--quick", action="store_true", help="one round, c=1,32, 2 s cells: about 1.5 minutes")
    tmp_root_arg(parser)
    parser.add_argument("--serve-flask", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.concurrency, args.limit_seconds = 2.0, 1.0, 1, "1,32", 0.6
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    if unknown := set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODELS)}")
    return args


def measure_in_process(args, workdir: Path, out: Console) -> tuple[dict[str, Path], dict[str, Workload]]:
    """Builds each model, scans its in-process limit and prepares what the load generator sends."""
    configure_tensorflow(args.tf_threads)
    paths, works = {}, {}
    for key in args.models:
        spec = MODELS[key]
        paths[key] = workdir / f"model-{key}"
        spec.build(paths[key])
        call = load_signature(paths[key])
        cells = measure_limit(spec, call, args.limit_seconds)
        works[key] = make_workload(spec, workdir, call)
        works[key].cells.extend(cells)
        works[key].limit_runs.append(max(cells, key=lambda c: c.rows_per_s))
        scan = ", ".join(f"b={c.rows_per_call} {c.rows_per_s:,.0f} rows/s" for c in cells)
        out.print(f"  {key} in-process: {scan}", highlight=False)
    return paths, works


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, here and in the children
    args = parse_args(argv)
    if args.serve_flask:
        return flask_main(args.serve_flask)
    out = console(160)
    started = time.monotonic()
    with work_dir("modelgrid-predictor-bench-", args.tmp_root) as workdir:
        out.print(
            f"work dir {workdir}; {os.cpu_count()} CPUs; TF threads {args.tf_threads}; {args.rounds} rounds of "
            f"cells of {args.warmup:g} s warm-up + {args.duration:g} s; concurrency {args.concurrency}"
        )
        paths, works = measure_in_process(args, workdir, out)
        with Mesh(workdir, LOG_LEVEL="WARNING") as mesh:
            registry = mesh.registry().target
            push_models(
                registry,
                {MODELS[k].registry_name: (p, MODELS[k].description) for k, p in paths.items()},
                "predictor-bench",
            )
            specs = [MODELS[key] for key in args.models]
            threads = {"TF_THREADS": str(args.tf_threads)}
            batching_on = {"MAX_BATCH_SIZE": str(args.max_batch_size), "MAX_QUEUE_DELAY_MS": str(args.queue_delay_ms)}
            servers = {
                OFF: predictor_server(mesh, registry, specs, "off", {"BATCHING_ENABLED": "false", **threads}),
                ON: predictor_server(
                    mesh, registry, specs, "on", {"BATCHING_ENABLED": "true", **batching_on, **threads}
                ),
            }
            if not args.skip_flask:
                servers[FLASK] = flask_server(mesh, paths, args.tf_threads)
            measure_served(servers, list(works.values()), args, workdir, out)
    out.print()
    for work in works.values():
        print_model_table(out, work)
    out.print(
        f"  batching on: MAX_BATCH_SIZE={args.max_batch_size}, MAX_QUEUE_DELAY_MS={args.queue_delay_ms:g} "
        "(--max-batch-size, --queue-delay-ms); "
        f"TF intra/inter-op threads {args.tf_threads} everywhere"
    )
    out.print(
        "  limit *: best batch size of the in-process scan; the best of the scan and one probe per round "
        "(taken while the servers are idle)"
    )
    out.print(
        f"  best of {args.rounds} interleaved rounds (runs: rows/s of each); cpu in cores (2.0 = both cores), "
        "other = the rest of the machine (idle servers, neighbours); batch/exec ms from the predictor's metrics"
    )
    for line in filter(None, [noise_warning(works), *target_checks(works)]):
        out.print(line, highlight=False)
    out.print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
