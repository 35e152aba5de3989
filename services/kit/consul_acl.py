"""Consul ACLs of a modelgrid mesh: what each service's token may do, and making the tokens with the master token.

Consul runs with `default_policy = "deny"`: a call without a token (or with an unknown one) may do nothing, so that
whoever reaches an agent cannot register a fake instance the gateway would route to. Each service gets a token of
its own (`ConsulAcl.token_for(name)`) whose policy lets it register only under its own service name, and read the
health of every service. The setup (kit.localinfra, scripts/mesh.py, the tests) makes them with the master token.

Command line (deploy/docker-compose.yml's one-shot `consul-acl`, against a Consul server with ACLs on)::

    python -m services.kit.consul_acl setup --consul-url http://consul:8500 --master-dir DIR --token-dir DIR \
        registry predictor trainer-agent trainer gateway

bootstraps the ACLs (once per cluster) into <master-dir>/master, and makes the agents' token and each named
service's token in <token-dir>/<name> (mode 0600); a second run keeps what exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from services.kit.private_files import read_private_file, write_private_file

logger = logging.getLogger(__name__)

TOKEN_HEADER = "X-Consul-Token"
TOKEN_ENV = "CONSUL_HTTP_TOKEN"
"""Consul's own convention, for the consul CLI and for a ConsulClient given no token."""
POLICY_PREFIX = "modelgrid-"
MASTER_TOKEN_FILE = "master"
"""The master token's file in setup's master dir."""
AGENT = "consul-agent"
"""The name under which the Consul agents' own token is made and kept (no modelgrid service is called so)."""
# A Consul service name as modelgrid uses them; it goes into HCL rules, so nothing else may pass.
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

AGENT_RULES = (
    'node_prefix "" { policy = "write" }\n'  # the agent registers and updates its own node (anti-entropy)
    'service_prefix "" { policy = "read" }\n'
    # deploy/consul-agent.sh asks its agent with this token: `consul info` (agent read), `consul leave` (agent write)
    'agent_prefix "" { policy = "write" }\n'
)
"""ACL rules of the agents' own token (acl.tokens.agent), `ConsulAcl.token_for(AGENT)`."""


def service_rules(name: str) -> str:
    """ACL rules of the token of the modelgrid service `name`: register, check and deregister instances under its
    own name only; read the healthy instances of every service; read its local agent's description."""
    if not _SERVICE_NAME.fullmatch(name):
        raise ValueError(f"not a modelgrid service name: {name!r}")
    return (
        # PUT /v1/agent/service/register (with its gRPC check), PUT /v1/agent/service/deregister/:id
        f'service "{name}" {{ policy = "write" }}\n'
        # GET /v1/health/service/:name (discovery, blocking queries), GET /v1/agent/service/:id (its own record)
        'service_prefix "" { policy = "read" }\n'
        # GET /v1/health/service/:name leaves out the instances on nodes the token cannot read
        'node_prefix "" { policy = "read" }\n'
        # GET /v1/agent/self: the address this host's agent uses (kit.hostaddr)
        'agent_prefix "" { policy = "read" }\n'
    ) + EXTRA_RULES.get(name, "")


EXTRA_RULES = {
    # Leader election (kit.leader): a session on its node, and the lock under the default leader_key's prefix.
    "trainer": 'session_prefix "" { policy = "write" }\nkey_prefix "modelgrid/trainer/" { policy = "write" }\n',
}
"""What a service's token may do besides registering: by service name."""


class ConsulTokenError(RuntimeError):
    """A Consul token file is missing, unreadable or empty; the message names the file, never its content. Not a
    ValueError on purpose: pydantic would wrap one into a ValidationError that prints the settings' input."""


def read_token_file(path: Path | str) -> str:
    """The token in `path`: its content without surrounding whitespace. Warns if other users may read the file."""
    path = Path(path)
    token = read_private_file(path, "Consul token", ConsulTokenError)
    if not token or any(ord(char) < 33 or ord(char) == 127 for char in token):
        raise ConsulTokenError(f"the Consul token file {path} is empty or holds more than one token")
    return token


def write_token_file(path: Path, token: str) -> None:
    """Writes `token` to `path` with mode 0600 (see write_private_file)."""
    write_private_file(path, f"{token}\n")


class AclSetupError(RuntimeError):
    """Consul refused or failed an ACL administration call."""


class ConsulAcl:
    """Makes ACL policies and tokens through an agent's HTTP API with the master (management) token.

    With `token_dir`, the token of each service is kept in `<token_dir>/<name>` (mode 0600), for the service to read
    (its `consul_token_file` setting) and for the next call, here or in another process (scripts/mesh.py), to give
    the same token again. `restore()` makes the kept tokens again in an agent that starts with no ACL state (a dev
    agent keeps it in memory only), so that services which kept running go on working across a Consul restart.
    """

    def __init__(self, http_url: str, master_token: str, *, token_dir: Path | None = None, timeout: float = 5.0):
        self.http_url = http_url.rstrip("/")
        self.token_dir = token_dir
        self._master_token = master_token
        self._timeout = timeout
        self._tokens: dict[str, str] = {}

    def master_accepted(self) -> bool:
        """True once the agent's servers know the master token (ACLs come up just after a leader is elected)."""
        try:
            status, _ = self._call("GET", "/v1/acl/token/self")
        except OSError:
            return False
        return status == 200

    def token_for(self, name: str) -> str:
        """The token of the modelgrid service `name` (see service_rules), or with AGENT that of the Consul agents
        (AGENT_RULES); made on the first call, the same token on every later call (and, with token_dir, in every
        process)."""
        if name in self._tokens:
            return self._tokens[name]
        rules = AGENT_RULES if name == AGENT else service_rules(name)  # checks the name: it also names a file
        kept = self.token_dir / name if self.token_dir is not None else None
        secret = read_token_file(kept) if kept is not None and kept.is_file() else str(uuid.uuid4())
        if not self._token_exists(secret):
            policy = f"{POLICY_PREFIX}{name}"
            what = "the Consul agents: their nodes" if name == AGENT else f"modelgrid service {name}: itself only"
            self._ensure_policy(policy, rules, what)
            self._create_token(secret, policy, what)
            logger.info("made the Consul ACL token of %s", name)
        if kept is not None and not kept.is_file():
            write_token_file(kept, secret)
        self._tokens[name] = secret
        return secret

    def token_file(self, name: str) -> Path:
        """The file that holds the token of `name` (made if need be); needs token_dir."""
        if self.token_dir is None:
            raise ValueError("token files need a token_dir")
        self.token_for(name)
        return self.token_dir / name

    def set_agent_token(self) -> None:
        """Hands the agents' token (AGENT_RULES: it keeps its node in the catalog) to the agent this object talks
        to, which persists it (acl.enable_token_persistence)."""
        self._expect("PUT", "/v1/agent/token/agent", {"Token": self.token_for(AGENT)})

    def restore(self) -> list[str]:
        """Makes again every token kept in token_dir that the agent does not know; returns the service names."""
        self._tokens.clear()
        if self.token_dir is None or not self.token_dir.is_dir():
            return []
        names = sorted(path.name for path in self.token_dir.iterdir() if _SERVICE_NAME.fullmatch(path.name))
        for name in names:
            self.token_for(name)
        return names

    def _token_exists(self, secret: str) -> bool:
        status, _ = self._call("GET", "/v1/acl/token/self", token=secret)
        if status in (200, 403):  # 403 "ACL not found": not (or no longer) known
            return status == 200
        raise AclSetupError(f"Consul at {self.http_url} answered {status} to GET /v1/acl/token/self")

    def _ensure_policy(self, name: str, rules: str, description: str) -> None:
        """Creates the policy, or brings an existing one of that name to these rules."""
        body = {"Name": name, "Description": description, "Rules": rules}
        status, reply = self._call("PUT", "/v1/acl/policy", body)
        if status == 200:
            return
        if "already exists" not in str(reply):
            raise AclSetupError(f"Consul at {self.http_url} refused to create policy {name}: {status} {reply}")
        existing = self._expect("GET", f"/v1/acl/policy/name/{urllib.parse.quote(name)}")
        if existing.get("Rules") != rules or existing.get("Description") != description:
            self._expect("PUT", f"/v1/acl/policy/{existing['ID']}", body)

    def _create_token(self, secret: str, policy: str, description: str) -> None:
        body = {"SecretID": secret, "Description": description, "Policies": [{"Name": policy}]}
        status, reply = self._call("PUT", "/v1/acl/token", body)
        if status != 200 and "already in use" not in str(reply):  # made meanwhile by another process
            raise AclSetupError(f"Consul at {self.http_url} refused to create a token for {policy}: {status} {reply}")

    def _expect(self, method: str, path: str, body: dict | None = None) -> dict:
        status, reply = self._call(method, path, body)
        if status != 200:
            raise AclSetupError(f"Consul at {self.http_url} answered {status} to {method} {path}: {reply}")
        return reply if isinstance(reply, dict) else {}

    def _call(
        self, method: str, path: str, body: dict | None = None, *, token: str | None = None
    ) -> tuple[int, object]:
        """(HTTP status, decoded JSON reply or its text). The token never appears in what this returns or raises."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.http_url}{path}", data=data, method=method)
        secret = token if token is not None else self._master_token
        if secret:
            request.add_header(TOKEN_HEADER, secret)
        try:
            with _NO_PROXY_OPENER.open(request, timeout=self._timeout) as response:
                status, text = response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace").strip()[:300]
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


def bootstrap_master(http_url: str, master_file: Path, wait: float = 60.0) -> str:
    """The master (management) token of a Consul cluster with ACLs on: the one in master_file if Consul knows it;
    else Consul's ACLs are bootstrapped (PUT /v1/acl/bootstrap, possible once per cluster) and the token it returns
    is kept in master_file (mode 0600). Waits up to `wait` seconds for the servers' ACL system to come up."""
    kept = read_token_file(master_file) if master_file.is_file() else ""
    deadline = time.monotonic() + wait
    while True:
        try:
            if kept and ConsulAcl(http_url, kept).master_accepted():
                return kept
            status, reply = ConsulAcl(http_url, "")._call("PUT", "/v1/acl/bootstrap")
        except OSError as exc:  # not answering yet
            status, reply = 0, str(exc)
        if status == 200 and isinstance(reply, dict):
            write_token_file(master_file, reply["SecretID"])
            logger.info("bootstrapped Consul's ACLs; the master token is in %s", master_file)
            return reply["SecretID"]
        done_before = status == 403 and "no longer allowed" in str(reply)
        if done_before and not kept:
            raise AclSetupError(
                f"Consul's ACLs were bootstrapped before, but {master_file} is missing: put the master token there, "
                "or reset the bootstrap (`consul acl bootstrap` with the reset index Consul logs; see SECURITY.md)"
            )
        if time.monotonic() > deadline:
            what = f"does not know the master token in {master_file}" if done_before else f"answered {status} {reply}"
            raise AclSetupError(f"Consul at {http_url} {what} (waited {wait:.0f}s)")
        time.sleep(0.5)


def setup(http_url: str, master_dir: Path, token_dir: Path, services: list[str], wait: float = 60.0) -> None:
    """Bootstraps the ACLs if need be, makes the agents' token and each service's token in token_dir, and gives
    the agents' token to the agent at http_url (a server: its own node). Idempotent."""
    master = bootstrap_master(http_url, master_dir / MASTER_TOKEN_FILE, wait)
    acl = ConsulAcl(http_url, master, token_dir=token_dir)
    for name in (AGENT, *services):
        print(f"{name}: Consul ACL token in {acl.token_file(name)}")
    acl.set_agent_token()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m services.kit.consul_acl`."""
    parser = argparse.ArgumentParser(prog="python -m services.kit.consul_acl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("setup", help="bootstrap the ACLs and make the agents' and the services' tokens")
    make.add_argument("--consul-url", default="http://127.0.0.1:8500", help="a Consul server's HTTP API")
    make.add_argument("--master-dir", type=Path, required=True, help="where the master token is (or goes)")
    make.add_argument("--token-dir", type=Path, required=True, help="where each token goes, in a file of its name")
    make.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Consul's ACL system")
    make.add_argument("services", nargs="+", help="Consul names of the services to make tokens for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        setup(args.consul_url, args.master_dir, args.token_dir, args.services, args.wait)
    except (AclSetupError, ConsulTokenError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
