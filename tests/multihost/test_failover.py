"""No single point of failure in the registry's state and blobs, on four test hosts:

    a: Consul server, Redis primary, sentinel                 (198.18.<k>.1)
    b: Consul server, Redis replica, sentinel, registry       (198.18.<k>.2)
    c: Consul server, Redis replica, sentinel, registry       (198.18.<k>.3)
    d: Consul client, an S3-compatible server (moto's)        (198.18.<k>.4)

Both registries keep blobs in one bucket on d and their state in Redis through the sentinels (REDIS_SENTINELS), with
guarded writes (a committed version, an alias move) waiting for a replica. The tests run in file order: a registry
host dies and the other serves every pull (its host then comes back); then the Redis primary's host dies under a
loop of guarded writes, the sentinels promote a replica, and no acknowledged write is lost.
"""

import shutil
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import boto3
import grpc
import pytest

from modelgrid.client.errors import ModelgridError
from modelgrid.client.registry import RegistryClient
from modelgrid.registry.v1 import registry_pb2 as rpb
from services.kit.localinfra import redis_binary, redis_ping, sentinel_binary

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

S3_PORT = 9000
BUCKET = "modelgrid-failover"
SENTINEL_PORT = 26379
MASTER = "modelgrid"
REGISTRY_PORT = 50051
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "failover-test",
    "AWS_SECRET_ACCESS_KEY": "failover-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
WRITE_LOOP_MAX_S = 120.0  # the guarded-write loop stops by itself at the latest then
FAILOVER_LIMIT_S = 60.0
# The hosts library (tests/multihost/hosts.py), which conftest.py loads by its path before any test module.
wait_for = sys.modules["modelgrid_tests_multihost_hosts"].wait_for
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def start_replica(hosts_lib, host, primary) -> None:
    (host.state_dir / "redis").mkdir(exist_ok=True)
    argv = [
        redis_binary(), "--port", "6379", "--bind", host.address, "127.0.0.1", "--protected-mode", "no",
        "--dir", f"{hosts_lib.STATE_PATH}/redis", "--appendonly", "yes", "--save", "",
        "--replicaof", primary.address, "6379", "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip
    host.spawn(argv, log_path=host.log_dir / "redis.log")
    wait_for(lambda: redis_ping(host.address, 6379), 30, f"the Redis replica on {host}")


def start_sentinel(hosts_lib, host, primary) -> None:
    """A sentinel on `host` watching `primary` (quorum 2 of 3), quick to act as in tests."""
    config = host.state_dir / "sentinel.conf"  # the sentinel rewrites it: on the host's own state path
    config.write_text(
        "\n".join([
            f"port {SENTINEL_PORT}",
            f"bind {host.address} 127.0.0.1",
            "protected-mode no",
            f"dir {hosts_lib.STATE_PATH}",
            f"sentinel monitor {MASTER} {primary.address} 6379 2",
            f"sentinel down-after-milliseconds {MASTER} 2000",
            f"sentinel failover-timeout {MASTER} 10000",
            f"sentinel parallel-syncs {MASTER} 1",
        ]) + "\n"
    )  # fmt: skip
    host.spawn([*sentinel_binary(), f"{hosts_lib.STATE_PATH}/sentinel.conf"], log_path=host.log_dir / "sentinel.log")
    wait_for(lambda: redis_ping(host.address, SENTINEL_PORT), 30, f"the sentinel on {host}")


def start_registry(host, ns) -> None:
    env = {
        f"MODELGRID_REGISTRY_{key}": value
        for key, value in {
            "PORT": str(REGISTRY_PORT),
            "HOST": host.address,
            "ADVERTISE_HOST": host.address,
            "CONSUL_URL": host.consul_url,
            # Plaintext on the lab's closed network: the lab's Consul agents have no certificate for mTLS health
            # checks (test_mesh.py runs the mesh with internal mTLS).
            "ALLOW_PLAINTEXT": "true",
            "REDIS_URL": "redis://unused:6379/0",  # the sentinels say where the primary is
            "REDIS_SENTINELS": ",".join(f"{h.address}:{SENTINEL_PORT}" for h in (ns.a, ns.b, ns.c)),
            "REDIS_SENTINEL_MASTER": MASTER,
            "REDIS_MIN_REPLICAS": "1",
            "REDIS_KEY_PREFIX": ns.prefix,
            "BLOB_BACKEND": "s3",
            "S3_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": ns.s3_url,
            "BLOB_DIR": f"{ns.hosts_lib.STATE_PATH}/registry/staging",
        }.items()
    }
    host.spawn([sys.executable, "-m", "services.registry"], {**env, **AWS_ENV}, host.log_dir / "registry.log")


def registry_client(target: str) -> tuple[grpc.Channel, RegistryClient]:
    channel = grpc.insecure_channel(target)
    return channel, RegistryClient(channel, client_id="pytest")


def registries(ns, asking) -> set[str]:
    return set(ns.consul.healthy(asking, "registry"))


def replicas_online(host) -> int:
    """Replicas the Redis on `host` reports as connected (0 when it is not a primary or does not answer)."""
    try:
        out = host.run([REDIS_CLI, "-p", "6379", "info", "replication"], timeout=5)
    except Exception:  # noqa: BLE001 - not answering is 0
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("slave") and "state=online" in line)


@pytest.fixture(scope="module")
def ha(hosts_lib, tmp_path_factory, build_saved_model):
    with hosts_lib.Lab(4, base_dir=tmp_path_factory.mktemp("failover-lab")) as lab:
        a, b, c, d = lab["a"], lab["b"], lab["c"], lab["d"]
        consul = hosts_lib.start_consul(lab, servers=3)
        hosts_lib.start_redis(a)
        for replica in (b, c):
            start_replica(hosts_lib, replica, a)
        for host in (a, b, c):
            start_sentinel(hosts_lib, host, a)
        d.spawn(
            [sys.executable, "-m", "moto.server", "-H", d.address, "-p", str(S3_PORT)],
            log_path=d.log_dir / "s3.log",
        )
        s3_url = f"http://{d.address}:{S3_PORT}"
        keys = {k.lower(): v for k, v in AWS_ENV.items() if "KEY" in k}  # aws_access_key_id, aws_secret_access_key
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name=AWS_ENV["AWS_DEFAULT_REGION"], **keys)
        wait_for(lambda: _bucket_made(s3), 60, "the S3 server on d")
        ns = SimpleNamespace(
            hosts_lib=hosts_lib, lab=lab, consul=consul, a=a, b=b, c=c, d=d, s3_url=s3_url,
            prefix=f"mg:failover:{uuid.uuid4().hex[:8]}:",
            tmp=tmp_path_factory.mktemp("failover"), build_saved_model=build_saved_model,
        )  # fmt: skip
        wait_for(lambda: replicas_online(a) == 2, 60, "two replicas online")
        for host in (b, c):
            start_registry(host, ns)
        wait_for(lambda: registries(ns, a) == {b.address, c.address}, 120, "the registries on b and c passing")
        yield ns


def _bucket_made(s3) -> bool:
    try:
        s3.create_bucket(Bucket=BUCKET)
        return True
    except Exception:  # noqa: BLE001 - not answering yet
        return False


def test_a_dead_registry_host_leaves_the_other_serving_every_pull_from_the_bucket(ha):
    a, b, c = ha.a, ha.b, ha.c
    channel, through_b = registry_client(f"{b.address}:{REGISTRY_PORT}")
    name = f"failover-{uuid.uuid4().hex[:8]}"
    try:
        through_b.ensure_model(name)
        pushed = [
            through_b.push_savedmodel(name, ha.build_saved_model(ha.tmp / f"m{seed}", seed=seed)) for seed in (1, 2)
        ]
        through_b.stub.SetAlias(rpb.SetAliasRequest(model_name=name, alias="production", version=2))
    finally:
        channel.close()
    assert not any((b.state_dir / "registry" / "staging").rglob("*.tar*")), "a blob stayed on b's disk"

    b.die()
    wait_for(lambda: registries(ha, a) == {c.address}, 60, "b's registry leaving Consul")
    channel, through_c = registry_client(f"{c.address}:{REGISTRY_PORT}")
    try:
        for version in pushed:
            dest = ha.tmp / f"pulled-{version.version}"
            through_c.pull(f"{name}:{version.version}", dest)
            assert through_c.resolve(f"{name}:{version.version}").artifact.digest == version.artifact.digest
        assert through_c.resolve(f"{name}@production").version == 2
    finally:
        channel.close()
    print(f"\nb dead: c's registry served both versions of {name} from the bucket on d")

    # b comes back, as a rebooted machine: its agent, Redis replica, sentinel and registry start again.
    b.restore()
    ha.consul.start_agent(b)
    start_replica(ha.hosts_lib, b, _primary(ha))
    start_sentinel(ha.hosts_lib, b, _primary(ha))
    start_registry(b, ha)
    wait_for(lambda: registries(ha, a) == {b.address, c.address}, 180, "b's registry back")
    wait_for(lambda: replicas_online(_primary(ha)) == 2, 60, "two replicas online again")


def _primary(ns):
    """The host whose Redis is the primary now, as a live sentinel says."""
    for host in (ns.a, ns.b, ns.c):
        try:
            argv = [REDIS_CLI, "-p", str(SENTINEL_PORT), "sentinel", "get-master-addr-by-name", MASTER]
            out = host.run(argv, timeout=5)
        except Exception:  # noqa: BLE001 - that sentinel's host is away
            continue
        address = out.stdout.split()[:1]
        if address:
            return ns.lab.host_at(address[0])
    raise AssertionError("no sentinel answers")


def test_a_dead_redis_primary_host_is_replaced_by_a_replica_and_no_guarded_write_is_lost(ha):
    b, c = ha.b, ha.c
    primary = _primary(ha)
    assert primary is ha.a, f"the test expects a to be the primary, not {primary}"
    name = f"guarded-{uuid.uuid4().hex[:8]}"
    channel, through_c = registry_client(f"{c.address}:{REGISTRY_PORT}")
    through_c.ensure_model(name)
    base = through_c.push_savedmodel(name, ha.build_saved_model(ha.tmp / "g", seed=3))
    acknowledged: list[tuple[str, int]] = []  # ("alias", version) moves the registry confirmed, in order
    failures: list[str] = []
    stop = threading.Event()

    def write_loop() -> None:
        started, n = time.monotonic(), 0
        while not stop.is_set() and time.monotonic() - started < WRITE_LOOP_MAX_S:
            n += 1
            alias = f"a{n}"
            try:
                through_c.stub.SetAlias(
                    rpb.SetAliasRequest(model_name=name, alias=alias, version=base.version), timeout=10
                )
                acknowledged.append((alias, time.monotonic()))
            except grpc.RpcError as err:
                failures.append(err.code().name)
            time.sleep(0.1)

    writer = threading.Thread(target=write_loop, daemon=True)
    writer.start()
    try:
        wait_for(lambda: len(acknowledged) >= 10, 60, "ten guarded alias moves")
        ha.a.die()
        died = time.monotonic()
        wait_for(
            lambda: any(at > died + 0.5 for _, at in acknowledged), FAILOVER_LIMIT_S, "a write after the fail-over"
        )
        back = min(at for _, at in acknowledged if at > died + 0.5) - died
        time.sleep(2)
    finally:
        stop.set()
        writer.join(30)
    try:
        model_aliases = set(through_c.get_model(name).aliases)
    except ModelgridError:
        model_aliases = set()
    lost = [alias for alias, _ in acknowledged if alias not in model_aliases]
    new_primary = _primary(ha)
    print(
        f"\na dead: {new_primary.letter} promoted, writes acknowledged again {back:.1f}s after the kill; "
        f"{len(acknowledged)} guarded alias moves acknowledged, {len(lost)} lost; "
        f"failures meanwhile: {sorted(set(failures))}"
    )
    channel.close()
    assert new_primary in (b, c)
    assert not lost, f"acknowledged alias moves lost across the fail-over: {lost}"
    assert set(failures) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, failures
