"""Worker agent settings (environment prefix MODELGRID_AGENT_)."""

import sys
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.kit.settings import MiB, ServiceSettings

# tf-keras (Keras 3's fit fails under MultiWorkerMirroredStrategy), quiet TensorFlow logs, and few compute threads
# per worker since several workers share one host. Two inter-op threads, as the worker itself defaults to: the
# collective ops of a group must be able to progress next to the op that waits on them.
DEFAULT_WORKER_ENV = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "2",
}


class AgentSettings(ServiceSettings):
    """Settings of a worker agent (one per host).

    `MODELGRID_AGENT_WORKER_COMMAND='["python", "my_worker.py"]'` runs another worker program; it is called with
    `--spec <spec.json>` appended.
    """

    model_config = SettingsConfigDict(env_prefix="MODELGRID_AGENT_", extra="ignore")

    port: int = 50071
    """gRPC port (0: any free port)."""
    service_name: str = "trainer-agent"
    """Consul service name the trainer looks agents up by."""
    allowed_callers: list[str] = ["trainer"]
    """With internal TLS (internal_tls_dir), the certificate identities that may call the agent: it starts
    processes, so only the trainer may."""
    slots: int = Field(default=2, ge=1)
    """Worker processes this agent runs at once; StartReplica beyond it fails with RESOURCE_EXHAUSTED."""
    work_dir: Path | None = None
    """Port reservations, the cache of registry blobs (`cache/sha256/<digest>`), and per replica its spec, log,
    progress file, checkpoints and export; empty: .run/agent-<bound port>. Nothing in it is shared with another
    host: data sets, checkpoints and exports come from and go to the registry."""
    registry_target: str = ""
    """host:port of the registry; empty: discover it in Consul."""
    registry_service: str = "registry"
    """Consul service name of the registry."""
    max_upload_bytes: int = Field(default=4096 * MiB, ge=1)
    """Largest checkpoint or SavedModel (as its tar) the agent uploads to the registry; a larger one is not
    uploaded and the replica reports why (a restarted group then resumes from an earlier checkpoint)."""
    registry_retry_seconds: float = Field(default=120.0, ge=0)
    """How long a download or upload keeps trying while the registry is unavailable (backoff 0.5 s doubling to
    10 s). A worker's exit is reported once the uploads of what it announced are done or given up."""
    worker_command: list[str] = Field(
        default_factory=lambda: [sys.executable, "-m", "services.trainer.worker"], min_length=1
    )
    """The worker program; `--spec <path>` is appended. It runs in the agent's working directory."""
    worker_env: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_WORKER_ENV))
    """Variables added to the agent's own environment for every worker (replaces the defaults when set)."""
    port_range_start: int = Field(default=0, ge=0, le=65535)
    """First port ReservePorts may hand out (0 with port_range_end 0: any port the kernel says is free)."""
    port_range_end: int = Field(default=0, ge=0, le=65535)
    """Last port ReservePorts may hand out (inclusive)."""
    worker_stop_grace_seconds: float = Field(default=10.0, ge=0)
    """At agent shutdown, how long workers have after SIGTERM (to save a checkpoint) before SIGKILL."""
    progress_poll_seconds: float = Field(default=0.15, gt=0, le=5)
    """How often each running worker's progress file is read for new lines."""
    watch_queue_size: int = Field(default=1000, ge=1)
    """Events buffered per WatchReplicas stream; a watcher that falls further behind is dropped (it reconnects)."""

    @model_validator(mode="after")
    def _check_port_range(self) -> Self:
        start, end = self.port_range_start, self.port_range_end
        if (start == 0) != (end == 0) or start > end:
            raise ValueError("port_range_start and port_range_end: both 0, or 1 <= start <= end")
        return self
