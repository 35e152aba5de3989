"""Registry settings (environment prefix MODELGRID_REGISTRY_)."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.kit.settings import MiB, ServiceSettings


class RegistrySettings(ServiceSettings):
    """Settings of the registry service."""

    model_config = SettingsConfigDict(env_prefix="MODELGRID_REGISTRY_", extra="ignore")

    port: int = 50051
    """gRPC port (0: any free port)."""
    redis_max_connections: int = Field(default=256, ge=4)
    """Size of the Redis connection pool: larger than other services', as every predictor replica and console
    keeps a WatchEvents stream open here."""
    max_watch_streams: int = Field(default=128, ge=0)
    """Most WatchEvents streams open at once (each holds a Redis connection); more get RESOURCE_EXHAUSTED."""
    blob_backend: Literal["local", "s3"] = "local"
    """Where artifact bytes live: "local", the directory blob_dir (a shared volume for several registries), or "s3",
    one bucket of an S3-compatible store (AWS S3, MinIO, Ceph RGW, ...; the s3_* settings), which registries on
    different hosts sharing one Redis share too. With s3 the registry does not start unless the bucket answers."""
    blob_dir: Path = Path(".run/registry/blobs")
    """Directory of the content-addressed artifact store (backend local); with backend s3, where uploads are staged
    while they arrive (and interrupted ones kept for resuming) before they go to the bucket."""
    s3_bucket: str = ""
    """Bucket of the s3 backend (required with it); it must exist, and the credentials need s3:ListBucket on it and
    s3:GetObject and s3:PutObject on the prefix. Credentials are those boto3 finds itself, never settings:
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_PROFILE with ~/.aws/credentials
    (AWS_SHARED_CREDENTIALS_FILE), or an instance or container role; the registry never logs them."""
    s3_prefix: str = "modelgrid/blobs"
    """Key prefix in the bucket: a blob is the object <prefix>/sha256/<digest>."""
    s3_endpoint_url: str = ""
    """Endpoint of an S3-compatible store, e.g. https://minio.internal:9000; empty: AWS S3 (boto3's endpoint for
    the region)."""
    s3_region: str = ""
    """Region of the bucket; empty: boto3's own (AWS_REGION / AWS_DEFAULT_REGION, ~/.aws/config, else us-east-1)."""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """Bucket in the URL path or in the host name; "auto" is boto3's choice (path style for a custom endpoint)."""
    s3_ca_file: Path | None = None
    """PEM bundle of the CA that signs the store's TLS certificate (a private CA); unset: the system's. TLS
    certificates are always verified."""
    s3_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    """How long a connection to the store may take to open."""
    s3_read_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long the store may stay silent on an open connection."""
    s3_max_attempts: int = Field(default=4, ge=1, le=20)
    """Attempts of each S3 request (boto3's standard retries with backoff: connection errors, throttling, 5xx); a
    store still unreachable after them fails the call with UNAVAILABLE."""
    s3_multipart_threshold_bytes: int = Field(default=64 * MiB, ge=5 * MiB)
    """Blobs of this size or larger are uploaded in parts, several at once (boto3's managed transfer)."""
    s3_multipart_chunk_bytes: int = Field(default=16 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    """Size of each part of a multipart upload (S3 allows 5 MiB to 5 GiB and at most 10,000 parts)."""
    max_artifact_bytes: int = Field(default=4096 * MiB, ge=1)
    """Largest artifact a version may carry; larger uploads fail with RESOURCE_EXHAUSTED."""
    upload_resume_ttl_seconds: float = Field(default=24 * 3600, ge=0)
    """How long the bytes of an upload cut short are kept for a client to resume it (UploadBlob from an offset)."""
    download_chunk_bytes: int = Field(default=1 * MiB, ge=4096, le=16 * MiB)
    """Size of each chunk DownloadArtifact sends."""
    max_description_chars: int = Field(default=16_384, ge=0)
    """Longest description of a model or version."""
    max_entries: int = Field(default=256, ge=0)
    """Most tags, metrics or params one model or version carries (each counted on its own)."""
    max_value_chars: int = Field(default=4096, ge=1)
    """Longest tag or param value."""
    max_recipe_bytes: int = Field(default=256 * 1024, ge=1, le=16 * MiB)
    """Largest version of a training recipe (a model tagged modelgrid.kind=recipe: one module's Python source)."""
    default_page_size: int = Field(default=50, ge=1)
    """Items per page when a list call does not say."""
    max_page_size: int = Field(default=1000, ge=1)
    """Cap on the page size a client may ask for."""
    events_max_length: int = Field(default=1_000_000, ge=1000)
    """Approximate number of events the Redis event stream keeps (older ones are trimmed)."""
    redis_key_prefix: str = "mg:registry:"
    """Prefix of every Redis key the registry writes (lets several registries share one Redis)."""

    @model_validator(mode="after")
    def _bucket_with_s3(self) -> Self:
        if self.blob_backend == "s3" and not self.s3_bucket.strip():
            raise ValueError("MODELGRID_REGISTRY_BLOB_BACKEND=s3 needs the bucket in MODELGRID_REGISTRY_S3_BUCKET")
        return self
