"""Registry push/pull throughput against a plain file copy on the same disk, and metadata RPCs per second.

What one run does (`make bench-registry`, about a minute for 200 MB on 2 cores):

* starts its own Consul dev agent, Redis server and `python -m services.registry` on free loopback ports, with
  the blob store in a temporary directory on the same filesystem as the baseline copies;
* writes an artifact of random bytes (--size-mb, default 200; MB = 10^6 bytes) and fsyncs it;
* times, --repeat times each and interleaved so background noise hits every step alike:
    plain copy   shutil.copyfile + fsync: what the disk and the page cache can do;
    hash copy    read, sha256, write + fsync: the least any store that verifies digests must do;
    push         RegistryClient.push_file with the digest precomputed: gRPC transfer, server-side sha256,
                 fsync and the Redis commit;
    push + hash  the same with the client hashing the file first (what `modelgrid push` does);
                 every push sends the same bytes, so after the first one the store drops its fsynced staged file
                 instead of renaming it (content-addressed): the bytes are still received, hashed and fsynced;
    pull         RegistryClient.download to a new file (client re-reads it to verify the digest), then fsync so
                 the bytes are on disk, as in the copy;
* runs GetModel, Resolve (name@alias), SetAlias, UpdateVersion (set_metrics) and CreateModel over a grpc.aio
  channel at concurrency 1 and 16 and reports ops/s and p50/p99 latency.

How to read it: the artifact is always in the page cache, so the copy mostly measures memory bandwidth plus the
fsync. Transfer rows are medians over the repeats; "vs plain copy" is that row's MB/s divided by the plain
copy's MB/s measured in the same run. Machines are noisy, so quote ratios, not absolute numbers: "push runs at
0.3x a plain copy" compares across machines, "400 MB/s" does not. The gap between "hash copy" and "push" is what
gRPC, Python and the server add beyond hashing. All metadata writes hit one model (a hot key): at concurrency
16 they include Redis WATCH retries. The benchmark process itself shares the CPU cores with the registry.
"""

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from harness import Mesh, console, milliseconds, percentile, table, tmp_root_arg, work_dir
from rich.console import Console

from modelgrid.client.artifacts import file_digest
from modelgrid.client.registry import RegistryClient
from modelgrid.common.v1 import common_pb2
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc

MB = 1_000_000
IO_BLOCK = 8 * 1024 * 1024
MODEL = "bench-model"
READ_ALIAS = "production"
WRITE_ALIAS = "bench"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_http_proxy", 0),  # loopback only: never through a proxy from the environment
]


@dataclass
class Row:
    """One line of the result table."""

    operation: str
    rate: str
    p50: str = "-"
    p99: str = "-"
    ratio: str = "-"
    detail: str = ""


# ---- files ---------------------------------------------------------------------------------------------------


def write_random_file(path: Path, size: int) -> None:
    """`size` random bytes, fsynced so that no later step pays for writing them back."""
    with path.open("wb") as out:
        remaining = size
        while remaining:
            block = os.urandom(min(IO_BLOCK, remaining))
            out.write(block)
            remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path`."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- transfer steps ------------------------------------------------------------------------------------------


def plain_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fsync_file(dst)


def hash_copy(src: Path, dst: Path) -> None:
    digest = hashlib.sha256()
    with src.open("rb") as inp, dst.open("wb") as out:
        while block := inp.read(IO_BLOCK):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    digest.hexdigest()


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure_transfers(client: RegistryClient, artifact: Path, workdir: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds per run of each transfer step; steps are interleaved within each repeat."""
    digest = file_digest(artifact)
    out = workdir / "out.bin"
    seconds: dict[str, list[float]] = {}
    versions: list[int] = []
    for _ in range(repeat):
        runs = {
            "plain copy": lambda: plain_copy(artifact, out),
            "hash copy": lambda: hash_copy(artifact, out),
            "push": lambda: versions.append(client.push_file(MODEL, artifact, digest=digest).version),
            "push + hash": lambda: versions.append(client.push_file(MODEL, artifact).version),
            "pull": lambda: (client.download(f"{MODEL}:{versions[-1]}", out), fsync_file(out)),
        }
        for name, step in runs.items():
            seconds.setdefault(name, []).append(timed(step))
            out.unlink(missing_ok=True)
    return seconds


TRANSFER_LEGEND = {
    "plain copy": "shutil.copyfile + fsync (the baseline)",
    "hash copy": "read + sha256 + write + fsync",
    "push": "digest precomputed; gRPC transfer + server sha256 + fsync + commit",
    "push + hash": "client hashes the file first, as `modelgrid push` does",
    "pull": "download + client re-reads it to check the digest + fsync",
}


def transfer_rows(seconds: dict[str, list[float]], size: int) -> list[Row]:
    """Median MB/s per step, its ratio to the plain copy, and every run's MB/s to show the noise."""
    baseline = size / statistics.median(seconds["plain copy"])
    rows = []
    for name, runs in seconds.items():
        rate = size / statistics.median(runs)
        spread = "/".join(f"{size / s / MB:.0f}" for s in runs)
        rows.append(Row(name, f"{rate / MB:,.0f} MB/s", ratio=f"{rate / baseline:.2f}x", detail=spread))
    return rows


# ---- metadata operations -------------------------------------------------------------------------------------


async def run_ops(call: Callable[[], Awaitable[object]], count: int, concurrency: int) -> tuple[float, float, float]:
    """`count` calls spread over `concurrency` workers on one event loop: ops/s, p50 and p99 ms."""
    remaining = iter(range(count))
    latencies: list[float] = []

    async def worker() -> None:
        for _ in remaining:  # shared iterator: the workers take turns until `count` calls are made
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return count / elapsed, percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3


def metadata_calls(stub: registry_pb2_grpc.ModelRegistryStub, versions: list[int]) -> dict[str, Callable]:
    """One zero-argument coroutine factory per operation; writes cycle through values so each call changes state."""
    counter = itertools.count()
    alias_ref = common_pb2.ModelRef(name=MODEL, alias=READ_ALIAS)
    return {
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(name=MODEL)),
        "Resolve alias": lambda: stub.Resolve(pb.ResolveRequest(ref=alias_ref)),
        "SetAlias": lambda: stub.SetAlias(
            pb.SetAliasRequest(model_name=MODEL, alias=WRITE_ALIAS, version=versions[next(counter) % len(versions)])
        ),
        "UpdateVersion": lambda: stub.UpdateVersion(
            pb.UpdateVersionRequest(model_name=MODEL, version=versions[-1], set_metrics={"score": next(counter)})
        ),
        "CreateModel": lambda: stub.CreateModel(pb.CreateModelRequest(name=f"bench-new-{next(counter)}")),
    }


async def measure_metadata(target: str, versions: list[int], ops: int) -> list[Row]:
    """Every metadata operation at concurrency 1 (ops/4 calls) and 16 (ops calls), after a short warm-up."""
    rows = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        await stub.SetAlias(pb.SetAliasRequest(model_name=MODEL, alias=READ_ALIAS, version=versions[0]))
        for name, call in metadata_calls(stub, versions).items():
            for concurrency, count in ((1, max(ops // 4, 50)), (16, ops)):
                await run_ops(call, 50, concurrency)
                rate, p50, p99 = await run_ops(call, count, concurrency)
                row = Row(f"{name} c={concurrency}", f"{rate:,.0f} ops/s", milliseconds(p50), milliseconds(p99))
                row.detail = f"{count} calls"
                rows.append(row)
    return rows


# ---- report --------------------------------------------------------------------------------------------------


def print_table(out: Console, title: str, rows: list[Row]) -> None:
    result = table(title, ("operation", "rate", "p50 ms", "p99 ms", "vs copy", "runs / calls"))
    for row in rows:
        result.add_row(row.operation, row.rate, row.p50, row.p99, row.ratio, row.detail)
    out.print(result)
    for name, timed_part in TRANSFER_LEGEND.items():
        out.print(f"  {name}: {timed_part}")
    out.print("  metadata: grpc.aio, one hot model, 50 warm-up calls first; c = calls in flight")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each transfer step (median reported)")
    parser.add_argument("--ops", type=int, default=2000, help="calls per metadata operation at concurrency 16")
    parser.add_argument("--quick", action="store_true", help="a 50 MB artifact, 2 runs, 500 ops (about 20 s)")
    tmp_root_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat, args.ops = 50, 2, 500
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = console(110)
    size = args.size_mb * MB
    with work_dir("modelgrid-bench-", args.tmp_root) as workdir, Mesh(workdir, LOG_LEVEL="WARNING") as mesh:
        target = mesh.registry().target
        artifact = workdir / "artifact.bin"
        write_random_file(artifact, size)
        same_fs = os.stat(workdir / "blobs").st_dev == os.stat(artifact).st_dev
        out.print(f"work dir {workdir} (filesystem mounted at {mount_point(workdir)})")
        out.print(
            f"blob store and baseline copies on {'the same filesystem' if same_fs else 'DIFFERENT filesystems'}; "
            f"artifact {args.size_mb} MB, {args.repeat} runs per transfer step, {os.cpu_count()} CPUs"
        )
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            client = RegistryClient(channel, client_id="registry-bench")
            client.ensure_model(MODEL, "registry benchmark")
            seconds = measure_transfers(client, artifact, workdir, args.repeat)
            versions = [v.version for v in client.stub.ListVersions(pb.ListVersionsRequest(model_name=MODEL)).versions]
        rows = transfer_rows(seconds, size)
        rows += asyncio.run(measure_metadata(target, sorted(versions), args.ops))
    print_table(out, f"registry vs plain copy ({args.size_mb} MB artifact, medians)", rows)


if __name__ == "__main__":
    main()
