"""Trainer settings (environment prefix MODELGRID_TRAINER_)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.kit.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """Settings of the trainer service."""

    model_config = SettingsConfigDict(env_prefix="MODELGRID_TRAINER_", extra="ignore")

    port: int = 50081
    """gRPC port (0: any free port)."""
    scratch_dir: Path = Field(
        default=Path(".run/trainer/scratch"),
        validation_alias=AliasChoices("scratch_dir", "MODELGRID_TRAINER_SCRATCH_DIR", "MODELGRID_TRAINER_SHARED_DIR"),
    )
    """The trainer's own scratch, shared with no other host: data set blobs it downloads to check their columns
    (datasets/<digest>). Data sets, checkpoints and exports reach the agents and come back through the registry
    only. (MODELGRID_TRAINER_SHARED_DIR, its former name, still sets it.)"""
    recipes_dir: Path = Path("services/trainer/recipes")
    """The only directory user recipe modules ("file:<path>") are loaded from; a recipe's source travels in the
    worker spec (at most 1 MiB)."""
    registry_target: str = ""
    """host:port of the registry; empty: discover it in Consul."""
    registry_service: str = "registry"
    """Consul service name of the registry."""
    agent_service: str = "trainer-agent"
    """Consul service name of the worker agents."""
    dataset_roots: list[Path] = Field(default_factory=list)
    """Directories on the trainer's host that a job's `dataset.local_path` may name: the path, with symlinks and
    `..` resolved, must lie inside one. Empty (the default): local paths are refused and data sets come only as
    registry blobs (`modelgrid jobs submit` uploads the file a spec names and sends its digest)."""
    max_workers: int = Field(default=16, ge=1)
    """Most worker processes one job may ask for."""
    max_epochs: int = Field(default=10_000, ge=1)
    """Most epochs one job may ask for."""
    max_batch_size: int = Field(default=65_536, ge=1)
    """Largest batch size (per replica) one job may ask for."""
    max_num_classes: int = Field(default=100_000, ge=2)
    """Most classes a data set may declare."""
    max_layer_units: int = Field(default=65_536, ge=1)
    """Largest layer (units, filters) a built-in recipe's parameters may ask for."""
    max_recipe_params_bytes: int = Field(default=65_536, ge=2)
    """Largest recipe_params, as JSON."""
    max_recipe_bytes: int = Field(default=256 * 1024, ge=1, le=1024 * 1024)
    """Largest registry recipe (`recipe: registry:<name>/<version>`, Python source) a job may use; its source
    travels in the worker spec, which holds at most 1 MiB of it."""
    max_steps_interval: int = Field(default=10_000_000, ge=1)
    """Largest checkpoint or report interval, in steps."""
    max_restarts_limit: int = Field(default=100, ge=0)
    """Largest restart budget one job may ask for."""
    default_checkpoint_every_steps: int = Field(default=50, ge=1)
    """Checkpoint interval when a job does not say."""
    upload_checkpoint_every: int = Field(default=1, ge=0)
    """The chief's agent uploads every Nth checkpoint the chief saves (and the one it saves when preempted) to the
    registry; a group restarted on any host resumes from the newest uploaded one. 0: none (a restart starts over)."""
    default_report_every_steps: int = Field(default=10, ge=1)
    """Progress interval when a job does not say."""
    default_max_restarts: int = Field(default=3, ge=0)
    """Restart budget when a job does not say (a job saying 0 gets none)."""
    hang_timeout_seconds: float = Field(default=300.0, gt=0)
    """No step progress this long after the group started: the group is killed and restarted."""
    start_timeout_seconds: float = Field(default=300.0, gt=0)
    """A group whose workers have not all started training within this is restarted."""
    restart_backoff_seconds: float = Field(default=1.0, ge=0)
    """First pause before restarting a group; doubles per restart, capped at 30 s."""
    register_retry_seconds: float = Field(default=600.0, ge=0)
    """How long a finished job keeps trying to register its model while the registry is unavailable (down,
    restarting, unreachable): it retries with backoff (1 s doubling to 30 s, with jitter) and stays FINALIZING with a
    message saying so, then fails. Retries are idempotent: they reuse the job's request id, so a try whose answer
    was lost does not create a second version. 0: one try."""
    record_shard_ids: bool = False
    """Workers record the example ids of their first-epoch shard (checks that shards are disjoint; one extra
    pass over the data)."""
    redis_key_prefix: str = "mg:trainer:"
    """Prefix of every Redis key the trainer writes (lets several trainers share one Redis)."""
    schedule_interval_seconds: float = Field(default=1.0, gt=0)
    """How often pending jobs are matched against free slots (also on every submit and agent change)."""
    leader_key: str = Field(
        default="modelgrid/trainer/leader", max_length=512, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
    )
    """Consul KV key whose lock the leading trainer holds (trainers sharing one Redis prefix must share it). The
    trainer's Consul token may write keys under modelgrid/trainer/ (kit.consul_acl): another key needs a policy
    that allows it."""
    leader_session_ttl_seconds: float = Field(default=15.0, ge=10, le=3600)
    """The leader's Consul session TTL, renewed every third of it from the moment it takes the lock. A dead host or
    a trainer that stops answering its health check loses the lead as soon as Consul sees it (seconds); one whose
    host and check look healthy but that stopped renewing loses it between this TTL and twice it (Consul's rule),
    and steps down by itself after two thirds of it without a renewal. A standby takes over right after."""
    leader_wait_seconds: float = Field(default=10.0, ge=0, le=300)
    """A write (SubmitJob, CancelJob) that reaches a trainer while no leader is known (it is starting, or taking
    over) waits this long for it to lead before UNAVAILABLE. With another trainer leading it is refused at once."""
    leader_lock_delay_seconds: float = Field(default=1.0, ge=0, le=60)
    """After a leader's session ends, how long Consul keeps the lock from the others. Fencing tokens already refuse
    a deposed leader's writes, so it can stay short."""
