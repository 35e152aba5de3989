"""Gateway settings (environment prefix MODELGRID_GATEWAY_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.kit.settings import MiB, ReplicaSettings

DEFAULT_ROUTES = {
    "modelgrid.registry.v1.": "registry",
    "modelgrid.predictor.v1.": "predictor",
    "inference.": "predictor",
    "tensorflow.serving.": "predictor",
    "modelgrid.trainer.v1.Trainer": "trainer",
}


class GatewaySettings(ReplicaSettings):
    """Settings of a gateway instance."""

    model_config = SettingsConfigDict(env_prefix="MODELGRID_GATEWAY_", extra="ignore")

    port: int = 8080
    """Native gRPC port (0: any free port)."""
    web_port: int = 8081
    """gRPC-Web, KServe v2 REST (/v2) and web console port, HTTP/1.1 and HTTP/2 (0: any free port, -1: off)."""
    metrics_port: int = 9180
    """Prometheus /metrics HTTP port (0: any free port, -1: off)."""
    routes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ROUTES))
    """Fully-qualified service name prefix -> Consul service name. The longest matching prefix wins; a call that
    matches none is UNIMPLEMENTED. A backend that adds an RPC needs no change here."""
    preferred_tags: dict[str, str] = Field(default_factory=lambda: {"trainer": "leader"})
    """Consul service -> the instance tag its calls go to while an instance carries it (others take them when
    none does): the leading trainer, elected in Consul, tags itself "leader"; standbys refuse writes."""
    retry_attempts: int = Field(default=3, ge=1)
    """Tries of a call that failed UNAVAILABLE before any response (each on another instance when there is one)."""
    non_idempotent_methods: list[str] = Field(
        default_factory=lambda: [
            "/modelgrid.registry.v1.ModelRegistry/CreateModel",
            "/modelgrid.registry.v1.ModelRegistry/CreateVersion",
            "/modelgrid.registry.v1.ModelRegistry/DeleteModel",
            "/modelgrid.trainer.v1.Trainer/SubmitJob",
            "/modelgrid.trainer.v1.Trainer/CancelJob",
            "/modelgrid.predictor.v1.Predictor/BatchPredict",
        ]
    )
    """Calls that change state: never retried unless the caller sends an `idempotency-key` header."""
    eject_seconds: float = Field(default=10.0, ge=0)
    """An instance that failed UNAVAILABLE is left out of rotation this long (passive health)."""
    auth_enabled: bool = True
    """Require an API key (`authorization: Bearer <secret>` or `x-api-key`) on every call. Off only for a gateway
    that nobody but its own host's programs can reach."""
    admin_key: str = ""
    """A bootstrap secret with every scope (to create the first keys). Empty: the one in admin_key_file."""
    admin_key_file: Path = Path(".run/gateway/admin-key")
    """Where the admin key is kept when admin_key is empty: read at start, or, when the file does not exist and auth
    is on, made (random, 256 bits) and written there with mode 0600 for the operator (`make up` prints where; the
    `modelgrid` CLI run from this checkout reads it)."""
    default_rate_limit: float = Field(default=100.0, gt=0)
    """Requests per second per API key, shared by every gateway instance through Redis."""
    rate_burst_seconds: float = Field(default=1.0, gt=0)
    """Bucket size in seconds of the rate: a key may burst rate x this many requests."""
    rate_lease_tokens: int = Field(default=20, ge=1)
    """Most tokens an instance takes from a key's shared bucket in Redis at once, spent on the key's next calls
    without asking Redis again (1: ask on every call). Tokens only come out of the shared bucket, so a key's sustained
    rate holds across every instance; its largest burst may grow by what the instances hold: at most this many (and
    rate x rate_lease_seconds) per instance."""
    rate_lease_seconds: float = Field(default=0.1, ge=0)
    """A lease is also at most rate x this many tokens (at least 1): a key whose rate is below 2 / this (20/s by
    default) takes one token per call from Redis, exactly as without leases."""
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    """How long an instance trusts an API key it checked in Redis without reading it again (0: read it on every
    call). A key revoked through another instance (or in Redis) is refused here at most this long afterwards; the
    instance that revokes it refuses it at once. Only keys that matched are kept, never a refusal."""
    api_key_cache_size: int = Field(default=10_000, ge=1)
    """Most API keys an instance keeps checked, and keeps leased rate-limit tokens of; when full, the oldest goes
    (only valid keys enter: invented ones cannot push them out)."""
    max_streams_per_caller: int = Field(default=16, ge=1)
    """Streaming calls (watches, uploads, downloads, prediction streams: any call that is not unary) one API key
    may hold open at once on a gateway instance, both fronts together; with auth off, one caller address. The next
    one is refused with RESOURCE_EXHAUSTED until one ends. Counted in each instance, not shared through Redis."""
    canary_alias: str = "canary"
    """Alias that takes a share of the stable alias's traffic when a model has a canary weight."""
    stable_alias: str = "production"
    """Alias whose traffic the canary shares."""
    canary_weight_tag: str = "modelgrid.canary-weight"
    """Registry model tag holding the canary's share (0..1); set it with UpdateModel, 0 rolls back at once."""
    registry_resync_seconds: float = Field(default=30.0, ge=1, le=86400)
    """When the registry's event stream delivered nothing for this long, open it again and read every canary
    weight: the safety net for a stream that hangs without an error."""
    cors_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8081", "http://localhost:8081"])
    """Origins allowed to call gRPC-Web from a browser ("*": any)."""
    web_allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"])
    """Host header values the web port answers: a name or address (any port), or name:port (that port only);
    "*": any (only behind a proxy that checks Host itself). The gateway's own advertise_host and bind host are
    always allowed. Other hosts get 421 before anything else: a page on a name of its own that resolves to this
    address (DNS rebinding) reaches nothing. Add the names browsers use for the console here."""
    web_body_timeout_seconds: float = Field(default=30.0, gt=0)
    """Longest wait on the web port for the next bytes of a request body that has not ended; a body that stalls
    longer ends the call with DEADLINE_EXCEEDED and closes the connection (HTTP/1.1)."""
    web_max_body_bytes: int = Field(default=1024 * MiB, ge=1024)
    """Largest gRPC-Web request body (all its frames; a message is also held to max_receive_message_bytes):
    a bigger one ends the call with RESOURCE_EXHAUSTED. Bigger uploads go through the native gRPC port. Also the
    largest KServe v2 REST request body (413)."""
    oip_rest_max_json_bytes: int = Field(default=64 * MiB, ge=1024)
    """Largest JSON part of a KServe v2 REST infer request on the web port (the body before its binary tensor data,
    if any): a bigger one gets 413 before it is parsed. Big tensors travel as binary data."""
    oip_rest_max_json_values: int = Field(default=4 * 1024 * 1024, ge=16)
    """Most values the JSON of one KServe v2 REST infer request may hold (counted from its commas and brackets before
    it is parsed: an upper bound), and most elements of an output answered as JSON rather than binary data: beyond
    it, 413. Bounds the Python objects a JSON request builds (tens of bytes each)."""
    oip_rest_timeout_seconds: float = Field(default=60.0, gt=0)
    """Deadline of each KServe v2 REST call on the web port (HTTP has no grpc-timeout): past it the call answers 504
    and its upstream call is cancelled. An infer request's `timeout` parameter (microseconds) can shorten it on the
    predictor."""
    web_dir: Path = Path("web/dist")
    """Built web console served at / on the web port (when the directory exists)."""
    tls_cert: Path | None = None
    """PEM certificate for both public ports (with tls_key); unset: plaintext."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    redis_key_prefix: str = "mg:gateway:"
    """Prefix of the gateway's Redis keys (API keys, rate-limit buckets)."""
