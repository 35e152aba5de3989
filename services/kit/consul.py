"""Consul agent HTTP API: register and deregister instances, and ask for the healthy ones (blocking queries)."""

import logging
import os
from dataclasses import dataclass, field

import httpx

from services.kit.consul_acl import TOKEN_ENV, TOKEN_HEADER

logger = logging.getLogger(__name__)

TOKEN_SETTINGS = "consul_token_file or consul_token (MODELGRID_<SERVICE>_CONSUL_TOKEN_FILE / _CONSUL_TOKEN)"
"""Where a service's Consul ACL token comes from, as error messages name it."""


class ConsulAclError(httpx.HTTPStatusError):
    """Consul refused a call (403): the ACL token is missing, unknown to Consul, or lacks a right. The message names
    the setting to fix and Consul's reason, never the token."""


def token_headers(token: str = "") -> dict[str, str]:
    """The header that carries a Consul ACL token: `token`, else $CONSUL_HTTP_TOKEN (Consul's own convention);
    none when both are empty (Consul then treats the call as anonymous)."""
    token = token or os.environ.get(TOKEN_ENV, "").strip()
    return {TOKEN_HEADER: token} if token else {}


def acl_refusal(response: httpx.Response) -> str:
    """What to tell an operator when Consul answered 403: Consul's reason ("ACL not found": the token is unknown;
    "Permission denied: Missing service:write on predictor": it lacks that right) and the setting to fix."""
    sent = TOKEN_HEADER in response.request.headers
    reason = response.text.strip()[:200] or "no reason given"
    what = "the Consul ACL token given does not allow it" if sent else "no Consul ACL token was given"
    return (
        f"Consul refused {response.request.method} {response.request.url.path} ({reason}): {what}; set "
        f"{TOKEN_SETTINGS} to this service's token (or $CONSUL_HTTP_TOKEN)"
    )


@dataclass(frozen=True)
class Instance:
    """One healthy instance of a service as Consul reports it."""

    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def target(self) -> str:
        """host:port for a gRPC channel."""
        return f"{self.address}:{self.port}"


@dataclass
class Registration:
    """What an instance tells Consul about itself; Consul checks its gRPC health endpoint."""

    id: str
    name: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    check_interval: str = "2s"
    check_timeout: str = "5s"
    deregister_critical_after: str = "1m"
    tls: bool = False  # the gRPC endpoint speaks TLS (the check then skips certificate verification)
    check_port: int = 0
    """Port of the gRPC health endpoint Consul checks; 0: `port` (a multi-process replica's supervisor answers on
    a port of its own)."""

    def payload(self, *, passing: bool = False) -> dict:
        """Body of PUT /v1/agent/service/register. The check starts critical, or passing when the instance already
        serves (a re-registration after the agent lost it must not take a serving instance out of rotation until
        Consul's first check runs)."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Address": self.address,
            "Port": self.port,
            "Tags": self.tags,
            "Meta": self.meta,
            "Check": {
                "CheckID": f"{self.id}:grpc-health",
                "Name": f"{self.name} gRPC health",
                "GRPC": f"{self.address}:{self.check_port or self.port}",
                "GRPCUseTLS": self.tls,
                "TLSSkipVerify": self.tls,
                "Interval": self.check_interval,
                "Timeout": self.check_timeout,
                "DeregisterCriticalServiceAfter": self.deregister_critical_after,
                "Status": "passing" if passing else "critical",
            },
        }

    def matches(self, registered: dict) -> bool:
        """True if the agent's record of this instance (GET /v1/agent/service/:id) says what this one says."""
        return (
            registered.get("Service") == self.name
            and registered.get("Address") == self.address
            and registered.get("Port") == self.port
            and sorted(registered.get("Tags") or []) == sorted(self.tags)
            and (registered.get("Meta") or {}) == self.meta
        )


class ConsulClient:
    """A small async client for the parts of Consul's agent and health APIs modelgrid uses."""

    def __init__(self, url: str, *, token: str = "", timeout: float = 10.0) -> None:
        """`token`: the ACL token sent with every call (a service's consul_token setting); empty:
        $CONSUL_HTTP_TOKEN, if set."""
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, headers=token_headers(token))

    async def register(self, registration: Registration, *, passing: bool = False) -> None:
        """Registers (or re-registers, to change tags and meta) an instance with the local agent; `passing` is the
        check's status until Consul runs it."""
        response = await self._http.put("/v1/agent/service/register", json=registration.payload(passing=passing))
        _raise_for_status(response)
        logger.info("registered %s (%s:%d) in Consul", registration.id, registration.address, registration.port)

    async def registered(self, instance_id: str) -> dict | None:
        """The local agent's record of an instance (GET /v1/agent/service/:id), None if the agent does not have
        it (e.g. it restarted and lost its in-memory state)."""
        response = await self._http.get(f"/v1/agent/service/{instance_id}")
        if response.status_code == 404:
            return None
        _raise_for_status(response)
        return response.json()

    async def deregister(self, instance_id: str) -> None:
        """Removes an instance from the local agent."""
        response = await self._http.put(f"/v1/agent/service/deregister/{instance_id}")
        _raise_for_status(response)
        logger.info("deregistered %s from Consul", instance_id)

    async def healthy_instances(
        self, service: str, *, index: int = 0, wait: str = "30s", tag: str | None = None
    ) -> tuple[int, list[Instance]]:
        """Instances whose checks all pass. With index > 0 this is a blocking query that returns when the answer
        changes or `wait` runs out; the returned index feeds the next call."""
        params: dict[str, str | int] = {"passing": "true"}
        if index:
            params.update(index=index, wait=wait)
        if tag:
            params["tag"] = tag
        index, entries = await self._health(service, params, index, wait)
        return index, [instance for instance, _ in entries]

    async def service_health(
        self, service: str, *, index: int = 0, wait: str = "30s"
    ) -> tuple[int, list[tuple[Instance, bool]]]:
        """Every registered instance with whether all its checks pass, so that a caller can tell an instance whose
        health check failed (present, not passing) from one the catalog does not hold at all. Blocking with
        index > 0, as healthy_instances."""
        params: dict[str, str | int] = {}
        if index:
            params.update(index=index, wait=wait)
        return await self._health(service, params, index, wait)

    async def _health(
        self, service: str, params: dict[str, str | int], index: int, wait: str
    ) -> tuple[int, list[tuple[Instance, bool]]]:
        timeout = duration_seconds(wait) + 10 if index else self._http.timeout.read
        response = await self._http.get(f"/v1/health/service/{service}", params=params, timeout=timeout)
        _raise_for_status(response)
        new_index = int(response.headers.get("X-Consul-Index", "0"))
        entries = []
        for entry in response.json():
            svc = entry["Service"]
            instance = Instance(
                id=svc["ID"],
                service=svc["Service"],
                address=svc["Address"] or entry["Node"]["Address"],
                port=svc["Port"],
                tags=tuple(svc.get("Tags") or ()),
                meta=dict(svc.get("Meta") or {}),
            )
            passing = all(check.get("Status") == "passing" for check in entry.get("Checks") or ())
            entries.append((instance, passing))
        return new_index, entries

    # -- sessions and KV locks (Consul's leader-election recipe) --------------------------------------------------

    async def create_session(
        self, name: str, *, ttl_seconds: float, checks: list[str], lock_delay_seconds: float
    ) -> str:
        """A session on the local agent's node (PUT /v1/session/create) that Consul invalidates when one of `checks`
        turns critical (e.g. "serfHealth": the node, and the holder's own service check) or when it is not renewed
        within `ttl_seconds`; a lock it held is then released. `lock_delay_seconds`: how long Consul refuses the
        lock to others after that."""
        body = {
            "Name": name,
            "TTL": f"{ttl_seconds:.0f}s",
            "Checks": checks,
            "LockDelay": f"{lock_delay_seconds:.0f}s",
            "Behavior": "release",
        }
        response = await self._http.put("/v1/session/create", json=body)
        _raise_for_status(response)
        return str(response.json()["ID"])

    async def renew_session(self, session_id: str) -> bool:
        """Restarts the session's TTL; False when Consul no longer has it (invalidated: its locks are gone)."""
        response = await self._http.put(f"/v1/session/renew/{session_id}")
        if response.status_code == 404:
            return False
        _raise_for_status(response)
        return True

    async def destroy_session(self, session_id: str) -> None:
        """Ends the session at once, releasing its locks (a leader that stops hands over without waiting)."""
        response = await self._http.put(f"/v1/session/destroy/{session_id}")
        _raise_for_status(response)

    async def acquire(self, key: str, session_id: str, value: bytes) -> bool:
        """Takes the lock on `key` for the session (PUT /v1/kv/:key?acquire=): True when it holds it now."""
        response = await self._http.put(f"/v1/kv/{key}", params={"acquire": session_id}, content=value)
        _raise_for_status(response)
        return response.json() is True

    async def read_key(self, key: str, *, index: int = 0, wait: str = "30s") -> tuple[int, dict | None]:
        """The KV entry of `key` (its Session, LockIndex, ModifyIndex...) or None; blocking with index > 0 until it
        changes or `wait` runs out. Returns the index for the next call with it."""
        params: dict[str, str | int] = {"index": index, "wait": wait} if index else {}
        timeout = duration_seconds(wait) + 10 if index else self._http.timeout.read
        response = await self._http.get(f"/v1/kv/{key}", params=params, timeout=timeout)
        new_index = int(response.headers.get("X-Consul-Index", "0"))
        if response.status_code == 404:
            return new_index, None
        _raise_for_status(response)
        entries = response.json()
        return new_index, (entries[0] if entries else None)

    async def close(self) -> None:
        """Closes the HTTP connection pool."""
        await self._http.aclose()


def _raise_for_status(response: httpx.Response) -> None:
    """raise_for_status, with a ConsulAclError that says what to fix for a 403 (callers log it, as any HTTPError)."""
    if response.status_code == 403:
        raise ConsulAclError(acl_refusal(response), request=response.request, response=response)
    response.raise_for_status()


def duration_seconds(duration: str) -> float:
    """Seconds in a Consul duration such as "30s", "2m" or "500ms"."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    for suffix, factor in units:
        if duration.endswith(suffix) and duration[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(duration[: -len(suffix)]) * factor
    raise ValueError(f"not a Consul duration: {duration!r}")
