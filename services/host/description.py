"""A host description: which modelgrid services one machine runs, its address, and the Consul cluster it joins.

A small TOML file per host (see deploy/hosts/ for a three-host example)::

    name = "b"                              # Consul node name; unique in the cluster
    address = "198.51.100.2"                # where the other hosts reach this one: bound and advertised
    state_dir = "/var/lib/modelgrid"        # pid files, logs, Consul's data, blobs, caches: this host's own disk
    redis_url = "redis://198.51.100.1:6379/0"
    redis_password_file = "/etc/modelgrid/redis-password"  # the one Redis password of the cluster (mode 0600):
                                            # made on the Redis host at its first `up` if missing; copy it to every
                                            # other host (default: <state_dir>/redis-password)
    tls_dir = "/etc/modelgrid/tls"          # the mesh's certificates (services/kit/tls.py): made once on the
                                            # operator's machine, copied to every host without the CA's key
                                            # (default: <state_dir>/tls); internal gRPC is mTLS
    consul_master_token_file = "/etc/modelgrid/consul-master-token"  # Consul's ACL master token (mode 0600):
                                            # made once by the operator, copied to every host; `up` stops at once
                                            # without it (default: <state_dir>/consul-master-token)

    [consul]                                # every host runs a Consul agent; services use the one on their host
    server = true                           # three hosts are servers
    bootstrap_expect = 3
    retry_join = ["198.51.100.1", "198.51.100.3"]
    # hcl = ["performance { raft_multiplier = 1 }"]   # extra agent configuration, if any

    [redis]                                 # present on the one host that runs Redis
    port = 6379

    [services.predictor]                    # one table per service this host runs
    port = 50061
    settings = { AUTO_LOAD = "true" }       # any of the service's settings, without its MODELGRID_<SERVICE>_ prefix

Consul runs with ACLs on (default deny; see SECURITY.md, "Consul's ACLs"). Its master token is one per cluster and
the operator makes it, once, before the first `up` of any host, then copies it to the same path on every host::

    (umask 077 && python3 -c "import uuid; print(uuid.uuid4())" > /etc/modelgrid/consul-master-token)

No host makes it by itself: the servers start at about the same time, and two of them each making one would give
the cluster two master tokens, of which it knows only the first leader's. The servers' agents get it as their master
token; every host's runner uses it for its own Consul calls and to make each of its services a token of its own
(<state_dir>/consul-tokens/<name>).
"""

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from services.kit.consul_acl import service_rules

# kind -> (module, settings prefix, Consul service name, default port), in start order: the registry first (the
# others read from it), the gateway last (it routes to the others).
SERVICE_KINDS: dict[str, tuple[str, str, str, int]] = {
    "registry": ("services.registry", "MODELGRID_REGISTRY_", "registry", 50051),
    "predictor": ("services.predictor", "MODELGRID_PREDICTOR_", "predictor", 50061),
    "agent": ("services.trainer.agent", "MODELGRID_AGENT_", "trainer-agent", 50071),
    "trainer": ("services.trainer", "MODELGRID_TRAINER_", "trainer", 50081),
    "gateway": ("services.gateway", "MODELGRID_GATEWAY_", "gateway", 8080),
}


class DescriptionError(ValueError):
    """The host description is malformed; the message names the field."""


@dataclass(frozen=True)
class ConsulConfig:
    server: bool = False
    bootstrap_expect: int = 3
    retry_join: tuple[str, ...] = ()
    http_port: int = 8500
    hcl: tuple[str, ...] = ()  # extra agent configuration, one HCL statement each (e.g. performance tuning)

    @property
    def url(self) -> str:
        """The local agent's HTTP API, on this host's loopback: what every service on the host talks to."""
        return f"http://127.0.0.1:{self.http_port}"


@dataclass(frozen=True)
class ServiceConfig:
    kind: str
    port: int
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return SERVICE_KINDS[self.kind][0]

    @property
    def prefix(self) -> str:
        return SERVICE_KINDS[self.kind][1]

    @property
    def consul_name(self) -> str:
        return self.settings.get("SERVICE_NAME", SERVICE_KINDS[self.kind][2])


@dataclass(frozen=True)
class HostDescription:
    name: str
    address: str
    state_dir: Path
    redis_url: str
    consul: ConsulConfig
    services: tuple[ServiceConfig, ...]
    redis_port: int | None = None  # this host runs Redis on this port
    redis_password_file: Path = Path("/var/lib/modelgrid/redis-password")  # Redis's password: the same on all hosts
    tls_dir: Path = Path("/var/lib/modelgrid/tls")  # the mesh's certificates (kit.tls): the same on all hosts
    # Consul's ACL master token (made by the operator): the same on all hosts
    consul_master_token_file: Path = Path("/var/lib/modelgrid/consul-master-token")

    @classmethod
    def load(cls, path: Path) -> "HostDescription":
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DescriptionError(f"{path}: {exc}") from exc
        return cls.parse(raw, where=str(path))

    @classmethod
    def parse(cls, raw: dict, where: str = "host description") -> "HostDescription":
        def fail(message: str) -> None:
            raise DescriptionError(f"{where}: {message}")

        known = {
            "name",
            "address",
            "state_dir",
            "redis_url",
            "redis_password_file",
            "tls_dir",
            "consul_master_token_file",
            "consul",
            "redis",
            "services",
        }
        unknown = set(raw) - known
        if unknown:
            fail(f"unknown field(s) {sorted(unknown)}")
        name, address = raw.get("name", ""), raw.get("address", "")
        if not isinstance(name, str) or not name.replace("-", "").isalnum():
            fail("name must be letters, digits and dashes")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            fail(f"address must be an IP address the other hosts reach this one at, got {address!r}")
        consul_raw = raw.get("consul", {})
        consul = ConsulConfig(
            server=bool(consul_raw.get("server", False)),
            bootstrap_expect=int(consul_raw.get("bootstrap_expect", 3)),
            retry_join=tuple(consul_raw.get("retry_join", ())),
            http_port=int(consul_raw.get("http_port", 8500)),
            hcl=tuple(str(line) for line in consul_raw.get("hcl", ())),
        )
        if not consul.retry_join and not (consul.server and consul.bootstrap_expect == 1):
            fail("consul.retry_join must name at least one other Consul server")
        services = []
        for kind, table in raw.get("services", {}).items():
            if kind not in SERVICE_KINDS:
                fail(f"unknown service {kind!r}; services are {sorted(SERVICE_KINDS)}")
            settings = {str(k).upper(): str(v) for k, v in table.get("settings", {}).items()}
            services.append(ServiceConfig(kind, int(table.get("port", SERVICE_KINDS[kind][3])), settings))
            try:
                service_rules(services[-1].consul_name)  # the name goes into its ACL token's rules and file name
            except ValueError:
                fail(f"services.{kind}: SERVICE_NAME must be lowercase letters, digits and dashes")
        services.sort(key=lambda s: list(SERVICE_KINDS).index(s.kind))
        redis_raw = raw.get("redis")
        redis_port = int(redis_raw.get("port", 6379)) if redis_raw is not None else None
        redis_url = raw.get("redis_url") or (f"redis://{address}:{redis_port}/0" if redis_port else "")
        if not redis_url and any(s.kind != "agent" for s in services):
            fail("redis_url is needed by every service but the agent (or run Redis here with a [redis] table)")
        state_dir = Path(raw.get("state_dir", "/var/lib/modelgrid"))
        password_file = raw.get("redis_password_file")
        if password_file is not None and not (isinstance(password_file, str) and Path(password_file).is_absolute()):
            fail(f"redis_password_file must be an absolute path, got {password_file!r}")
        tls_dir = raw.get("tls_dir")
        if tls_dir is not None and not (isinstance(tls_dir, str) and Path(tls_dir).is_absolute()):
            fail(f"tls_dir must be an absolute path, got {tls_dir!r}")
        token_file = raw.get("consul_master_token_file")
        if token_file is not None and not (isinstance(token_file, str) and Path(token_file).is_absolute()):
            fail(f"consul_master_token_file must be an absolute path, got {token_file!r}")
        return cls(
            name=name,
            address=address,
            state_dir=state_dir,
            redis_url=redis_url,
            consul=consul,
            services=tuple(services),
            redis_port=redis_port,
            redis_password_file=Path(password_file) if password_file else state_dir / "redis-password",
            tls_dir=Path(tls_dir) if tls_dir else state_dir / "tls",
            consul_master_token_file=Path(token_file) if token_file else state_dir / "consul-master-token",
        )
