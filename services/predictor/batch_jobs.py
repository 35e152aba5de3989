"""Bulk prediction jobs: a data set (an NPZ blob in the registry, one array per signature input) is predicted in
slices on one pinned model version, with progress and cancellation kept in Redis so any replica can answer
GetBatchJob; the results are stored back in the registry as an NPZ blob (one array per output)."""

import asyncio
import dataclasses
import enum
import io
import json
import logging
import math
import tempfile
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from modelgrid.client.convert import parse_number
from modelgrid.client.errors import FailedPrecondition, InvalidArgument, ModelgridError, NotFound, ResourceExhausted
from modelgrid.client.modelref import ModelRef
from modelgrid.client.registry import AsyncRegistryClient
from services.predictor.control import ModelControl
from services.predictor.inference import Inference
from services.predictor.settings import DEFAULT_MAX_BULK_INPUT_BYTES, MAX_BULK_INPUT_BYTES_SETTING

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINAL_STATES = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


@dataclass
class BatchJob:
    """A bulk prediction job as stored in Redis."""

    id: str
    model: str  # the reference as given, e.g. "digits@production"
    input_digest: str
    output_filter: list[str] = field(default_factory=list)
    batch_size: int = 0
    state: JobState = JobState.PENDING
    version: int = 0
    total_records: int = 0
    done_records: int = 0
    output_digest: str = ""
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    instance: str = ""
    cancel_requested: bool = False


class BatchJobs:
    """Accepts, runs, reports and cancels bulk prediction jobs."""

    def __init__(
        self,
        redis: aioredis.Redis,
        registry: AsyncRegistryClient,
        inference: Inference,
        control: ModelControl,
        *,
        instance: str = "",
        default_batch_size: int,
        max_records: int,
        max_input_bytes: int = DEFAULT_MAX_BULK_INPUT_BYTES,
        key_prefix: str = "mg:predictor:",
    ) -> None:
        self._redis = redis
        self._registry = registry
        self._inference = inference
        self._control = control
        self.instance = instance  # this replica's Consul id (known once the server is bound): whose jobs are whose
        self._default_batch_size = default_batch_size
        self._max_records = max_records
        self._max_input_bytes = max_input_bytes
        self._prefix = f"{key_prefix}jobs"
        self._tasks: dict[str, asyncio.Task] = {}

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:{job_id}"

    async def _save(self, job: BatchJob) -> None:
        job.updated_at = time.time()
        await self._redis.set(self._key(job.id), json.dumps(dataclasses.asdict(job)))

    async def get(self, job_id: str) -> BatchJob:
        raw = await self._redis.get(self._key(job_id)) if job_id else None
        if raw is None:
            raise NotFound(f"no batch job {job_id!r}")
        data = json.loads(raw)
        data["state"] = JobState(data["state"])
        return BatchJob(**data)

    async def list_jobs(self, page_size: int, page_token: str) -> tuple[list[BatchJob], str]:
        """Jobs newest first; the token is the offset of the next page."""
        start = parse_number(page_token, "page_token") if page_token else 0
        size = min(page_size or 50, 1000)
        ids = await self._redis.zrevrange(self._prefix, start, start + size)
        jobs = []
        for job_id in ids[:size]:
            try:
                jobs.append(await self.get(job_id))
            except NotFound:
                continue
        return jobs, str(start + size) if len(ids) > size else ""

    async def submit(self, ref: ModelRef, input_digest: str, output_filter: list[str], batch_size: int) -> BatchJob:
        """Validates and stores a job, then runs it in the background on this replica."""
        if batch_size < 0:
            raise InvalidArgument("batch_size must be >= 0")
        self._control.select(ref)  # NotFound / Unavailable before anything is stored
        job = BatchJob(
            id=uuid.uuid4().hex[:16],
            model=str(ref),
            input_digest=input_digest,
            output_filter=list(output_filter),
            batch_size=batch_size or self._default_batch_size,
            created_at=time.time(),
            instance=self.instance,
        )
        await self._save(job)
        await self._redis.zadd(self._prefix, {job.id: job.created_at})
        self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"batch-job-{job.id}")
        self._tasks[job.id].add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job

    async def check_input(self, digest: str) -> None:
        """NotFound when the data set `digest` is not in the registry (before a job is accepted for it)."""
        await self._registry.stat_blob(digest)

    async def store_records(self, groups: list[dict[str, np.ndarray]]) -> str:
        """Stores streamed record groups in the registry as one NPZ data set; returns its digest."""
        with tempfile.TemporaryDirectory(prefix="modelgrid-records-") as tmp:
            path = Path(tmp) / "records.npz"
            await asyncio.to_thread(records_to_npz, groups, path)
            return (await self._registry.upload_blob(path)).digest

    async def cancel(self, job_id: str) -> BatchJob:
        job = await self.get(job_id)
        if job.state in FINAL_STATES:
            raise FailedPrecondition(f"batch job {job_id} is already {job.state.value}")
        job.cancel_requested = True
        await self._redis.set(self._key(job.id), json.dumps(dataclasses.asdict(job)))
        return job

    async def fail_orphans(self) -> None:
        """Jobs this instance was running when it stopped cannot resume: mark them FAILED."""
        for job_id in await self._redis.zrange(self._prefix, 0, -1):
            job = await self.get(job_id)
            if job.instance == self.instance and job.state not in FINAL_STATES:
                job.state, job.error = JobState.FAILED, "the predictor running it restarted"
                await self._save(job)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _run(self, job: BatchJob) -> None:
        try:
            await self._execute(job)
        except asyncio.CancelledError:
            job.state, job.error = JobState.FAILED, "the predictor shut down"
            await asyncio.shield(self._save(job))
            raise
        except ModelgridError as exc:
            job.state, job.error = JobState.FAILED, str(exc)
        except Exception as exc:  # noqa: BLE001 - the job records the failure; the replica keeps serving
            logger.exception("batch job %s failed", job.id)
            job.state, job.error = JobState.FAILED, f"internal error: {type(exc).__name__}"
        await self._save(job)

    async def _execute(self, job: BatchJob) -> None:
        ref = ModelRef.parse(job.model)
        version = self._control.select(ref)  # pinned: the whole job runs on this version
        pinned = ModelRef(ref.name, version=version.version)
        job.state, job.version = JobState.RUNNING, version.version
        with tempfile.TemporaryDirectory(prefix="modelgrid-batch-") as tmp:
            source = Path(tmp) / "input.npz"
            await self._registry.download_blob(job.input_digest, source)
            inputs = await asyncio.to_thread(_load_npz, source, self._max_input_bytes)
            job.total_records = _record_count(inputs, self._max_records)
            await self._save(job)
            results: dict[str, list[np.ndarray]] = {}
            for start in range(0, job.total_records, job.batch_size):
                if (await self.get(job.id)).cancel_requested:
                    job.state = JobState.CANCELLED
                    return
                part = {name: array[start : start + job.batch_size] for name, array in inputs.items()}
                prediction = await self._inference.predict(pinned, part, job.output_filter, protocol="batch")
                for name, array in prediction.outputs.items():
                    results.setdefault(name, []).append(array)
                job.done_records = min(start + job.batch_size, job.total_records)
                await self._save(job)
            output = Path(tmp) / "output.npz"
            await asyncio.to_thread(_save_npz, output, {k: np.concatenate(v) for k, v in results.items()})
            job.output_digest = (await self._registry.upload_blob(output)).digest
            job.state = JobState.SUCCEEDED
            logger.info("batch job %s: %d records on %s", job.id, job.total_records, pinned)


NPY_SUFFIX = ".npy"
MAX_MEMBER_NAME_CHARS = 64


def _member_label(name: str) -> str:
    """A zip member's name for error messages, cut short when long."""
    short = name[:MAX_MEMBER_NAME_CHARS] + ("..." if len(name) > MAX_MEMBER_NAME_CHARS else "")
    return f"array {short!r}"


def _npy_header(member, label: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of an .npy stream; reads (and so decompresses) only its first bytes."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InvalidArgument(f"{label} uses .npy format version {version[0]}.{version[1]}; save it with np.savez")
    return shape, dtype


def check_npz(path: Path, max_bytes: int) -> None:
    """Refuses, before anything is decompressed, an NPZ that would take more than `max_bytes` once loaded or that
    is no plain NPZ: each member's uncompressed size comes from the zip directory and each array's shape and dtype
    from its .npy header (the first bytes of its stream). ResourceExhausted over the limit, InvalidArgument for a
    file numpy would not load safely (not a zip, a member that is no .npy array, object arrays, a header that
    declares more data than its member holds: numpy would allocate the declared size before reading)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InvalidArgument("the input data set is not an NPZ file (a zip of .npy arrays, from np.savez)") from None
    with archive:
        infos = archive.infolist()
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise ResourceExhausted(
                f"the input data set unpacks to {declared} bytes, more than the limit of {max_bytes} bytes "
                f"({MAX_BULK_INPUT_BYTES_SETTING}); split it into smaller jobs"
            )
        for info in infos:
            label = _member_label(info.filename)
            if info.is_dir() or not info.filename.endswith(NPY_SUFFIX):
                raise InvalidArgument(f"the input data set holds {label}, which is no .npy array")
            try:
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member, label)
            except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error):
                raise InvalidArgument(f"{label} in the input data set is not a readable .npy array") from None
            if dtype.hasobject:
                raise InvalidArgument(f"{label} holds Python objects; bulk inputs must be arrays of numbers")
            if any(d < 0 for d in shape):
                raise InvalidArgument(f"{label} declares a negative dimension")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > info.file_size:
                raise InvalidArgument(
                    f"{label} declares {nbytes} bytes of data but its member holds {info.file_size}; the file is "
                    "damaged or forged"
                )


def _load_npz(path: Path, max_bytes: int = DEFAULT_MAX_BULK_INPUT_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an NPZ data set, once `check_npz` has bounded what they take in memory."""
    check_npz(path, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # damaged data after sound headers
        raise InvalidArgument(f"the input data set is not a readable NPZ file ({type(exc).__name__})") from None


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def _record_count(inputs: dict[str, np.ndarray], max_records: int) -> int:
    counts = {array.shape[0] if array.ndim else 0 for array in inputs.values()}
    if len(counts) != 1:
        raise InvalidArgument(f"input arrays disagree on the number of records: {sorted(counts)}")
    count = counts.pop()
    if count > max_records:
        raise ResourceExhausted(f"{count} records exceed the limit of {max_records} (MAX_BATCH_JOB_RECORDS)")
    return count


def records_to_npz(groups: list[dict[str, np.ndarray]], path: Path) -> int:
    """Writes streamed record groups as one NPZ (arrays concatenated along the first dimension); returns records."""
    if not groups:
        raise InvalidArgument("BatchPredict received no records and no input_digest")
    names = set(groups[0])
    if any(set(g) != names for g in groups):
        raise InvalidArgument("every Records message must carry the same inputs")
    try:
        arrays = {name: np.concatenate([g[name] for g in groups]) for name in names}
    except ValueError as exc:
        raise InvalidArgument(f"records do not stack: {exc}") from None
    _save_npz(path, arrays)
    return _record_count(arrays, 1 << 62)
