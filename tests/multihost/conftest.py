"""Fixtures of the multi-host tier: test hosts on this machine (a network and a mount namespace each, on a private
bridge; see hosts.py), a Consul cluster and a Redis server on them. They need root, iproute2 and util-linux; without
them the tests are skipped.

`hosts_lib` is the hosts.py module itself (loaded by its path: nothing under tests/ is imported as a package), for a
test that builds a lab of its own."""

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def _load_hosts_lib() -> ModuleType:
    name = "modelgrid_tests_multihost_hosts"
    if name not in sys.modules:  # registered before running it: dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("hosts.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


hosts = _load_hosts_lib()


def _why_no_lab() -> str:
    """Why test hosts cannot be built here, "" if they can."""
    if os.geteuid() != 0:
        return "multi-host tests need root (they create network and mount namespaces)"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"multi-host tests need {', '.join(missing)} (iproute2, util-linux): run `make setup`"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"multi-host tests need `ip netns`, which fails here: {probe.stderr.strip()}"
    return ""


@pytest.fixture(scope="session")
def hosts_lib() -> ModuleType:
    """The hosts.py module (Lab, start_consul, start_redis, wait_for, ...); skips where labs cannot be built."""
    reason = _why_no_lab()
    if reason:
        pytest.skip(reason)
    return hosts


@pytest.fixture(scope="module")
def lab(hosts_lib, tmp_path_factory) -> Iterator["hosts.Lab"]:
    """Three test hosts a, b, c for the module (198.18.<k>.1-3; the test process is 198.18.<k>.254). Torn down
    at the end of the module, even after failures; the teardown fails if anything of the lab is left."""
    with hosts_lib.Lab(3, base_dir=tmp_path_factory.mktemp("lab")) as built:
        yield built
    leftovers = built.leftovers()
    assert not leftovers, f"the lab left these behind: {leftovers}"


@pytest.fixture(scope="module")
def consul_cluster(hosts_lib, lab) -> "hosts.ConsulCluster":
    """A Consul agent on every host of `lab`, all three servers; ready (a leader, every member alive)."""
    return hosts_lib.start_consul(lab, servers=3)


@pytest.fixture(scope="module")
def lab_redis(hosts_lib, lab) -> "hosts.LabRedis":
    """Redis on host a (its address and loopback, port 6379), AOF on, data in a's /var/lib/modelgrid/redis."""
    return hosts_lib.start_redis(lab["a"])
