"""Registry settings (environment prefix MODELGRID_REGISTRY_)."""

from pathlib import Path

from pydantic import Field
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
    blob_dir: Path = Path(".run/registry/blobs")
    """Directory of the content-addressed artifact store."""
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
