"""Predictor settings (environment prefix MODELGRID_PREDICTOR_)."""

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.kit.settings import MiB, ReplicaSettings

DEFAULT_MAX_REQUEST_BYTES = 256 * MiB
DEFAULT_MAX_BULK_INPUT_BYTES = 1024 * MiB
MAX_REQUEST_BYTES_SETTING = "MODELGRID_PREDICTOR_MAX_REQUEST_BYTES"
MAX_BULK_INPUT_BYTES_SETTING = "MODELGRID_PREDICTOR_MAX_BULK_INPUT_BYTES"


class ModelConfig(BaseModel):
    """A model to serve from start-up and its version policy (at most one of latest, versions, aliases)."""

    name: str
    """Registered model name."""
    latest: int = 0
    """Serve the N newest READY versions (the default policy is latest=1)."""
    versions: list[int] = []
    """Serve these exact versions."""
    aliases: list[str] = []
    """Serve the versions these aliases point at, following them as they move."""
    all_aliases: bool = False
    """Also serve the target of every alias the model has."""


class PredictorSettings(ReplicaSettings):
    """Settings of a predictor replica.

    `MODELGRID_PREDICTOR_MODELS='[{"name": "digits", "aliases": ["production"]}]'` serves digits@production.
    """

    model_config = SettingsConfigDict(env_prefix="MODELGRID_PREDICTOR_", extra="ignore")

    port: int = 50061
    """gRPC port (0: any free port)."""
    metrics_port: int = 9161
    """Prometheus /metrics HTTP port (0: any free port, -1: off)."""
    registry_target: str = ""
    """host:port of the registry; empty: discover healthy registry instances in Consul."""
    registry_service: str = "registry"
    """Consul service name of the registry."""
    models: list[ModelConfig] = []
    """Models to serve from start-up; more can be loaded with LoadModel."""
    auto_load: bool = False
    """Serve every model in the registry (its latest version and every alias), including models registered
    later: what `make up` runs, so that `modelgrid push` is enough to serve a model."""
    cache_dir: Path = Path(".run/predictor/cache")
    """Where downloaded artifacts are unpacked (content-addressed; one directory per replica)."""
    cache_max_bytes: int = Field(default=8192 * MiB, ge=MiB)
    """Size bound of the artifact cache; least recently used artifacts not in use are evicted."""
    max_batch_size: int = Field(default=32, ge=1)
    """Rows the dynamic batcher puts in one model execution."""
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    """How long the first queued request may wait for others to join its batch. 0: a request runs at once when
    the model is idle, and the requests that arrive while a batch executes form the next one (batches grow with
    load, and an idle model adds no delay)."""
    max_queue_depth: int = Field(default=1024, ge=1)
    """Queued requests per model version beyond which requests fail at once with RESOURCE_EXHAUSTED."""
    batching_enabled: bool = True
    """Dynamic batching on; off executes each request alone."""
    inline_when_idle: bool = True
    """With max_queue_delay_ms 0: a request that finds its model idle runs at once on the request's own path (the
    event loop), without the hop to the execution thread; the batching path takes over as soon as requests overlap.
    It saves about a third of a fast model's single-request latency."""
    inline_max_exec_ms: float = Field(default=5.0, ge=0)
    """Models whose executions take longer than this never run inline: an inline run holds the event loop."""
    max_request_rows: int = Field(default=4096, ge=1)
    """Largest first dimension one Predict request may carry."""
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=MiB)
    """Memory the input tensors of one request may take once decoded, all inputs together, in every protocol (a
    string element counts 64 bytes for its Python object, plus its bytes when they arrive raw). Checked on the
    declared shapes before anything is allocated; a request over it fails with RESOURCE_EXHAUSTED. It bounds what
    a small message can ask for: TensorFlow Serving's rule that a few typed values fill a larger shape (the last
    one repeated, or zeros) turns a few bytes into any size. Keep it above max_receive_message_bytes: raw tensors
    take about their message size."""
    warmup_requests: int = Field(default=2, ge=0)
    """Synthetic requests run on a newly loaded version before it takes traffic."""
    swap_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    """In a replica of several processes: how long a newly loaded version waits (PREPARED) for the other processes
    to load it too before it serves anyway. A process that failed to load it, or cannot be reached, is not waited
    for."""
    follow_registry: bool = True
    """Follow the registry's event stream to load new versions and move aliases (hot swap)."""
    registry_resync_seconds: float = Field(default=30.0, ge=1, le=86400)
    """When the registry's event stream delivered nothing for this long, open it again and reconcile every served
    model: the safety net for a stream that hangs without an error, as Kubernetes' informers resync."""
    batch_job_batch_size: int = Field(default=256, ge=1)
    """Records per model call in bulk jobs when the job does not say."""
    max_batch_job_records: int = Field(default=10_000_000, ge=1)
    """Largest number of records one bulk job may hold."""
    max_streamed_job_bytes: int = Field(default=512 * MiB, ge=MiB)
    """Largest input a client may stream into BatchPredict (larger data sets go to the registry first)."""
    max_bulk_input_bytes: int = Field(default=DEFAULT_MAX_BULK_INPUT_BYTES, ge=MiB)
    """Largest size a bulk job's input data set may have once unpacked (its arrays together; a job holds them in
    memory). Read from the NPZ's zip directory and .npy headers before anything is decompressed, so a small
    compressed file that would unpack to gigabytes fails its job with a clear error."""
    tf_threads: int = Field(default=0, ge=0)
    """TensorFlow intra- and inter-op threads (0: TensorFlow's default; in a replica of several processes, each
    process's share of the cores)."""
