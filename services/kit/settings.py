"""Settings every modelgrid service shares; each service subclasses them with its own env prefix."""

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.kit.consul_acl import read_token_file
from services.kit.redis_auth import read_password_file, url_with_password
from services.kit.redis_client import parse_sentinels
from services.kit.tls import InternalTLS, from_dir

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Network, discovery, state, telemetry and limit settings common to all services.

    Subclasses set `model_config = SettingsConfigDict(env_prefix="MODELGRID_<SERVICE>_")`, so for the registry
    `MODELGRID_REGISTRY_PORT=50051` sets `port`.
    """

    model_config = SettingsConfigDict(env_prefix="MODELGRID_", extra="ignore", use_attribute_docstrings=True)

    host: str = "auto"
    """Address the gRPC server binds to: "auto" binds the advertised address (kit.hostaddr), 0.0.0.0 in containers,
    127.0.0.1 to stay on this machine."""
    port: int = 0
    """Port the gRPC server binds to; 0 picks a free port (tests)."""
    advertise_host: str = "auto"
    """Address other services and Consul's health check use to reach this instance. "auto": this host's address as
    its local Consul agent knows it (127.0.0.1 with a dev agent on loopback; see kit.hostaddr); empty: the
    address this host's name resolves to, socket.gethostbyname(socket.gethostname()) (in a container: its address
    on the compose network, which differs per replica)."""
    instance_id: str = ""
    """Consul service id of this instance; empty: <service>-<advertise_host>-<port>."""
    consul_url: str = "http://127.0.0.1:8500"
    """Consul agent HTTP API."""
    consul_token: str = Field(default="", repr=False)
    """Consul ACL token of this service (Consul denies what a token does not allow): it may register this service's
    name only and read the health of every service (kit.consul_acl). Better given in consul_token_file. Empty and
    no file: $CONSUL_HTTP_TOKEN, Consul's own convention. The settings' repr leaves it out."""
    consul_token_file: Path | None = None
    """File holding the Consul ACL token (a compose or Kubernetes secret; `make up` makes .run/consul-tokens/<name>):
    when set, the token is read from it once, as the settings are built, and wins over consul_token. A missing or
    empty file is an error at start."""
    consul_enabled: bool = True
    """Register in Consul on start and deregister on shutdown."""
    consul_check_interval: str = "2s"
    """How often Consul calls this instance's gRPC health endpoint."""
    consul_check_timeout: str = "5s"
    """How long Consul waits for the health answer before the check fails (a busy host answers slowly)."""
    consul_deregister_after: str = "1m"
    """Consul removes this instance after its check has been critical this long (a crashed process)."""
    consul_resync_interval: float = Field(default=2.0, gt=0, le=60)
    """How often (seconds) the service checks that its local Consul agent still holds its registration, and
    registers again if not (an agent that restarted has lost it). Re-registration takes at most about twice this
    after the agent answers again."""
    discovery_hold_seconds: float = Field(default=60.0, ge=0, le=3600)
    """When Consul fails or restarts with an empty catalog, how long the instances it last reported healthy stay
    in use while they register again; instances whose health check fails still leave at once."""
    internal_tls_dir: Path | None = None
    """Directory of the mesh's CA and certificates (`python -m services.kit.tls init DIR`). Set: the service's gRPC
    port requires a client certificate signed by that CA, and its channels to other services present this
    service's certificate and check theirs. Unset: plaintext, which a service accepts only on a loopback address
    unless allow_plaintext says otherwise."""
    allow_plaintext: bool = False
    """Serve plaintext gRPC on a non-loopback address without internal_tls_dir (a network you trust entirely)."""
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    """Redis holding the service's state. Redis requires a password: give it here (redis://:PASSWORD@host:6379/0,
    percent-encoded) or, better, in redis_password_file. Logs show this URL with the password masked
    (kit.redis_auth.redacted_url); the settings' repr leaves it out."""
    redis_password_file: Path | None = None
    """File holding the Redis password (a compose or Kubernetes secret; `make up` makes .run/redis-password): when
    set, the password is read from it once, as the settings are built, and used for the connection in place of any
    password in redis_url. A missing or empty file is an error at start."""
    redis_max_connections: int = Field(default=64, ge=4)
    """Size of the service's Redis connection pool. A call that finds every connection busy waits for one (see
    redis_pool_timeout_seconds) instead of failing at once."""
    redis_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    """How long a call waits for a free Redis connection before it fails with UNAVAILABLE."""
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Redis Sentinel addresses (host:port; in the environment comma-separated or a JSON list). Set: the service
    connects to the primary the sentinels name for redis_sentinel_master, and after a fail-over to the new one
    without a restart; redis_url then gives only the password (or redis_password_file does) and the database, not
    the host. Empty: redis_url's server, as without Sentinel."""
    redis_sentinel_master: str = "modelgrid"
    """The name the sentinels monitor the primary under (`sentinel monitor NAME ...` in their configuration)."""
    redis_sentinel_password_file: Path | None = None
    """File holding the password the sentinels themselves require (their `requirepass`), when they require one;
    read once, as the settings are built. Unset: the sentinels are asked without a password."""
    redis_min_replicas: int | None = Field(default=None, ge=0, le=16)
    """How many replicas must acknowledge a write that must not be lost (a committed model version, an alias move,
    a job state change) before it is answered: Redis' WAIT after the write. Fewer within
    redis_replica_ack_timeout_ms: the call fails with UNAVAILABLE saying the write is applied on the primary but not
    acknowledged. 0: no WAIT. Unset: 1 with redis_sentinels, 0 with a plain redis_url."""
    redis_replica_ack_timeout_ms: int = Field(default=1000, ge=1, le=20000)
    """How long (milliseconds) a guarded write waits for redis_min_replicas replicas to acknowledge it."""
    max_watch_streams: int = Field(default=24, ge=0)
    """Most watch streams (WatchEvents, WatchJob) open at once; each holds a Redis connection, so this stays well
    below redis_max_connections. More are refused with RESOURCE_EXHAUSTED."""
    max_receive_message_bytes: int = Field(default=64 * MiB, ge=1024)
    """Largest gRPC message the server accepts (streams send many messages)."""
    max_send_message_bytes: int = Field(default=64 * MiB, ge=1024)
    """Largest gRPC message the server sends."""
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    """On SIGTERM, how long in-flight calls may finish before they are cancelled."""
    otel_exporter: Literal["none", "console", "otlp"] | None = None
    """Where trace spans go: nowhere, stderr, or an OTLP/gRPC collector. Unset: the standard OTEL_TRACES_EXPORTER
    (none when that is unset too; kit.telemetry)."""
    otel_endpoint: str = ""
    """OTLP collector endpoint (http://host:4317 plaintext, https:// TLS), used when the exporter is otlp. Empty: the
    standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317."""
    otel_sample_ratio: float | None = Field(default=None, ge=0, le=1)
    """Share of new traces sampled (a trace a caller sampled is always continued). Unset: the standard
    OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (default: every trace)."""
    health_port: int = Field(default=-1, ge=-1, le=65535)
    """A plaintext port that serves grpc.health.v1 alone, for probes that cannot present the client certificate
    internal mTLS asks for (Kubernetes' built-in grpc probes); it tells whether the service serves, nothing else.
    -1: off (0: any free port)."""
    metrics_port: int = Field(default=-1, ge=-1, le=65535)
    """Prometheus /metrics HTTP port on `host` (0: any free port, -1: off): RPC counts, latency and calls in flight
    (kit.metrics), and the service's own metrics and gauges. Default -1, except the predictor's 9161 and the
    gateway's 9180."""
    log_level: str = "INFO"
    """Root log level."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as human-readable text or one JSON object each."""

    _sentinel_password: str | None = PrivateAttr(default=None)

    def redis_sentinel_password(self) -> str | None:
        """The password of redis_sentinel_password_file (None without one); in no repr and no log."""
        return self._sentinel_password

    def internal_tls(self, identity: str) -> InternalTLS | None:
        """This service's certificates as `identity` (kit.tls), or None when internal_tls_dir is not set."""
        return from_dir(self.internal_tls_dir, identity)

    @model_validator(mode="after")
    def _consul_token_from_file(self) -> Self:
        """Puts the token of consul_token_file into consul_token (the error names the file, never a token)."""
        if self.consul_token_file is not None:
            self.consul_token = read_token_file(self.consul_token_file)
        return self

    @model_validator(mode="after")
    def _redis_password_from_file(self) -> Self:
        """Puts the password of redis_password_file into redis_url (the error names the file, never a password)."""
        if self.redis_password_file is not None:
            self.redis_url = url_with_password(self.redis_url, read_password_file(self.redis_password_file))
        return self

    @model_validator(mode="after")
    def _redis_sentinel_password_from_file(self) -> Self:
        """Reads the sentinels' password once (the error names the file, never a password)."""
        if self.redis_sentinel_password_file is not None:
            self._sentinel_password = read_password_file(self.redis_sentinel_password_file)
        return self

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        """From the environment "a:26379,b:26379" or '["a:26379", "b:26379"]', or a list; each must be host:port."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [part for part in text.split(",") if part.strip()]
        if isinstance(value, list):
            parse_sentinels([str(item) for item in value])  # ValueError names the address that is not host:port
            return [str(item).strip() for item in value]
        return value

    @field_validator("advertise_host")
    @classmethod
    def _own_address_when_empty(cls, value: str) -> str:
        """Resolves an empty advertise_host when the settings are built (never at import)."""
        return value or socket.gethostbyname(socket.gethostname())


class ReplicaSettings(ServiceSettings):
    """Settings of a service whose replica may run several serving processes on one port (kit.replica)."""

    processes: int = Field(default=0, ge=0, le=64)
    """Serving processes of this replica, all on its port (SO_REUSEPORT), each with its own copy of the work (for a
    predictor: every model loaded). 0: the cores this process may use. 1: a single process, no supervisor."""
    supervisor_port: int = Field(default=0, ge=0, le=65535)
    """With several processes: the port of the replica's own health endpoint, which Consul checks (0: any free
    port; it is registered with the replica)."""
    worker_index: int = Field(default=-1, ge=-1)
    """Set by the supervisor for its workers (-1: not a worker)."""
    control_socket: str = ""
    """Set by the supervisor: the Unix socket a worker also listens on, for the supervisor and its siblings."""

    def process_count(self) -> int:
        """How many serving processes this replica runs."""
        return self.processes or len(os.sched_getaffinity(0))

    @property
    def is_worker(self) -> bool:
        return self.worker_index >= 0

    def sibling_sockets(self) -> list[str]:
        """A worker's siblings' control sockets (the supervisor names them worker-<i>.sock in one directory)."""
        if not self.control_socket:
            return []
        own = Path(self.control_socket)
        return sorted(str(path) for path in own.parent.glob("worker-*.sock") if path != own)
