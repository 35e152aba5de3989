"""This host's address: the one a service binds and advertises to the other hosts, found rather than configured.

With `host` or `advertise_host` set to "auto" (the default), a service asks at start:

- its local Consul agent (a loopback URL, one agent per host as Consul is meant to be run): the address the agent
  itself uses in the cluster (`Member.Addr` of /v1/agent/self), which is this host's address on the network the
  hosts share. A dev agent bound to 127.0.0.1 answers 127.0.0.1, so one machine keeps working as before;
- a Consul agent elsewhere (a container reaching a `consul` container): the address of the interface the route to
  it leaves from (a UDP socket "connected" to it; no packet is sent);
- no Consul: 127.0.0.1.
"""

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import httpx

from services.kit.consul import acl_refusal, token_headers

logger = logging.getLogger(__name__)

AUTO = "auto"
LOOPBACK = "127.0.0.1"


async def host_address(
    consul_url: str, *, consul_enabled: bool = True, timeout: float = 5.0, consul_token: str = ""
) -> str:
    """This host's address as seen from the other hosts (see the module's docstring). `consul_token`: the ACL token
    to ask the agent with (empty: $CONSUL_HTTP_TOKEN, kit.consul.token_headers)."""
    if not consul_enabled:
        return LOOPBACK
    parts = urlsplit(consul_url)
    host, port = parts.hostname or LOOPBACK, parts.port or 8500
    if not _is_loopback(host):
        return _route_source(host, port)
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=token_headers(consul_token)) as http:
            response = await http.get(f"{consul_url.rstrip('/')}/v1/agent/self")
            if response.status_code == 403:
                logger.error("cannot learn this host's address, using %s: %s", LOOPBACK, acl_refusal(response))
                return LOOPBACK
            response.raise_for_status()
            address = response.json()["Member"]["Addr"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        logger.warning(
            "cannot ask the Consul agent at %s for this host's address (%s); using %s", consul_url, exc, LOOPBACK
        )
        return LOOPBACK
    return str(ipaddress.ip_address(address))


async def resolve_addresses(settings) -> None:
    """Replaces "auto" in `settings.advertise_host` and `settings.host` (bind to the advertised address) with this
    host's address. Idempotent; every service calls it before it binds or registers anything."""
    if settings.advertise_host == AUTO:
        settings.advertise_host = await host_address(
            settings.consul_url, consul_enabled=settings.consul_enabled, consul_token=settings.consul_token
        )
        logger.info("this host's address: %s", settings.advertise_host)
    if settings.host == AUTO:
        settings.host = settings.advertise_host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _route_source(host: str, port: int) -> str:
    """The local address of the interface the route to host:port leaves from."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((socket.gethostbyname(host), port))
            return sock.getsockname()[0]
    except OSError as exc:
        logger.warning("no route to Consul at %s (%s); using %s", host, exc, LOOPBACK)
        return LOOPBACK
