"""The registry on Redis through Sentinel, with real processes on loopback: a primary, one replica (replicaof) and three
sentinels (Debian's redis-sentinel, their own password, down-after 1 s, failover-timeout 5 s), and a registry process
given only the sentinels' addresses (its redis_url's host is a dead port: it must not be used).

Asserted: guarded writes (versions, alias moves) wait for the replica; with the replica stopped they fail within the
ack timeout with UNAVAILABLE saying the write is applied on the primary, while reads and unguarded writes go on; after
kill -9 of the primary under a writer, the sentinels promote the replica and the same registry process (no restart)
writes on the new primary; no write acknowledged before the kill is lost.
"""

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from redis import Redis

from modelgrid.registry.v1 import registry_pb2 as pb
from services.kit.localinfra import RedisSentinel, RedisServer
from services.kit.redis_auth import write_password_file

pytestmark = pytest.mark.slow

MASTER = "modelgrid"
ACK_TIMEOUT_MS = 1000
FAILOVER_LIMIT_S = 20.0  # down-after 1 s, then the vote and the promotion: a few seconds; bounded far above


@dataclass
class SentinelSet:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[RedisSentinel]
    sentinel_password: str
    sentinel_password_file: Path

    def master_port(self, sentinel: RedisSentinel) -> int | None:
        try:
            with Redis(port=sentinel.port, password=self.sentinel_password, socket_timeout=2) as client:
                address = client.sentinel_get_master_addr_by_name(MASTER)
        except OSError:
            return None
        return int(address[1]) if address else None

    def ready(self) -> bool:
        """Every sentinel sees the other two and the replica, and the replica is in sync."""
        for sentinel in self.sentinels:
            with Redis(port=sentinel.port, password=self.sentinel_password, socket_timeout=2) as client:
                state = client.sentinel_master(MASTER)
            if state["num-other-sentinels"] != len(self.sentinels) - 1 or state["num-slaves"] != 1:
                return False
        return in_sync(self.replica)


def in_sync(replica: RedisServer) -> bool:
    with Redis(port=replica.port, password=replica.password, socket_timeout=2) as client:
        return client.info("replication").get("master_link_status") == "up"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"never happened: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    primary = RedisServer(tmp_path / "primary", appendfsync="always")
    replica = RedisServer(
        tmp_path / "replica", appendfsync="always", password=primary.password, replica_of=primary.port
    )
    sentinel_password = "sentinels-" + uuid.uuid4().hex
    password_file = tmp_path / "sentinel-password"
    write_password_file(password_file, sentinel_password)
    sentinels = [
        RedisSentinel(
            tmp_path / f"sentinel-{i}",
            primary_port=primary.port,
            redis_password=primary.password,
            master=MASTER,
            quorum=2,
            password=sentinel_password,
        )
        for i in range(3)
    ]
    started: list = []
    try:
        for process in (primary, replica, *sentinels):
            process.start()
            started.append(process)
        group = SentinelSet(primary, replica, sentinels, sentinel_password, password_file)
        wait_for(group.ready, "sentinels that see each other and the replica in sync")
        yield group
    finally:
        for process in reversed(started):
            process.stop()  # by its own pid (Popen), SIGTERM then SIGKILL


@pytest.fixture
def sentinel_registry(consul, sentinel_set, launch, tmp_path):
    """A registry that knows Redis only through the sentinels (min replicas 1, ack timeout 1 s), out of Consul."""
    process = launch.registry(
        consul.http_url,
        "redis://127.0.0.1:1/0",  # the host is the sentinels' business: this dead port must never be dialled
        tmp_path,
        CONSUL_ENABLED="false",
        REDIS_PASSWORD_FILE=str(sentinel_set.primary.password_file),
        REDIS_SENTINELS=",".join(s.address for s in sentinel_set.sentinels),
        REDIS_SENTINEL_MASTER=MASTER,
        REDIS_SENTINEL_PASSWORD_FILE=str(sentinel_set.sentinel_password_file),
        REDIS_MIN_REPLICAS="1",
        REDIS_REPLICA_ACK_TIMEOUT_MS=str(ACK_TIMEOUT_MS),
    )
    yield process
    process.stop()


def create_version(stub, model: str, request_id: str, data: bytes) -> pb.ModelVersion:
    meta = pb.VersionMetadata(
        model_name=model,
        artifact_digest=hashlib.sha256(data).hexdigest(),
        artifact_size=len(data),
        request_id=request_id,
    )
    return stub.CreateVersion(
        iter([pb.CreateVersionRequest(metadata=meta), pb.CreateVersionRequest(chunk=data)]), timeout=30
    )


@dataclass
class Writes:
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)  # acknowledged: request id -> (n, digest)
    moves: list[int] = field(default_factory=list)  # acknowledged alias moves, in order
    attempted_moves: list[int] = field(default_factory=list)  # every move tried (acknowledged or not)
    failures: list[tuple[grpc.StatusCode, str, float]] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)  # when each write was acknowledged


def writer(stub, model: str, writes: Writes, stop: threading.Event, max_ops: int = 300, seconds: float = 60) -> None:
    """Versions and moves of the alias "prod" to the newest acknowledged version, one call at a time."""
    end = time.monotonic() + seconds
    for op in range(max_ops):
        if stop.is_set() or time.monotonic() > end:
            return
        try:
            if op % 2 == 0 or not writes.versions:
                request_id, data = f"w{op}-{uuid.uuid4().hex[:6]}", os.urandom(1024)
                version = create_version(stub, model, request_id, data)
                writes.versions[request_id] = (version.version, version.artifact.digest)
            else:
                target = max(number for number, _ in writes.versions.values())
                writes.attempted_moves.append(target)
                stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="prod", version=target), timeout=30)
                writes.moves.append(target)
            writes.acks.append(time.monotonic())
        except grpc.RpcError as err:
            writes.failures.append((err.code(), err.details() or "", time.monotonic()))
            time.sleep(0.1)


def assert_replica_error(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{err.code().name}: {err.details()}"
    details = err.details() or ""
    assert "wrote this change on its primary" in details and f"within {ACK_TIMEOUT_MS} ms" in details, details
    assert "retry" in details and "Error" not in details, details


def test_guarded_writes_survive_a_failover_and_fail_clearly_without_a_replica(
    sentinel_set, sentinel_registry, client_for, unique
):
    group = sentinel_set
    channel, client = client_for(sentinel_registry)
    stub = client.stub
    model = unique("ha")
    pid = sentinel_registry.process.pid
    try:
        stub.CreateModel(pb.CreateModelRequest(name=model), timeout=30)
        first = create_version(stub, model, "first", b"first version")
        stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="prod", version=first.version), timeout=30)
        with Redis(port=group.replica.port, password=group.replica.password, decode_responses=True) as direct:
            prefix = sentinel_registry.env["MODELGRID_REGISTRY_REDIS_KEY_PREFIX"]
            assert direct.hget(f"{prefix}model:{model}:aliases", "prod") == str(first.version), "not on the replica"

        # -- the replica stopped: guarded writes fail within the ack timeout, clearly; the rest goes on ----------
        group.replica.stop()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            create_version(stub, model, "no-replica", b"while the replica is down")
        took = time.monotonic() - started
        assert_replica_error(caught.value)
        assert took < ACK_TIMEOUT_MS / 1000 + 3.0, f"the guarded write took {took:.2f}s to fail"
        with pytest.raises(grpc.RpcError) as caught:
            stub.SetAlias(pb.SetAliasRequest(model_name=model, alias="prod", version=first.version), timeout=30)
        assert_replica_error(caught.value)
        print(f"\nwithout its replica, a guarded write failed after {took:.2f}s: {caught.value.details()}")
        # Applied on the primary, as the message says: the version is there (and a retry with its request id
        # returns it rather than making another).
        assert stub.GetModel(pb.GetModelRequest(name=model), timeout=10).latest_version == 2
        stub.UpdateModel(pb.UpdateModelRequest(name=model, description="unguarded writes go on"), timeout=10)
        group.replica.start()
        wait_for(lambda: in_sync(group.replica), "the replica in sync again")
        again = create_version(stub, model, "no-replica", b"ignored: the request id was seen")
        assert again.version == 2

        # -- kill -9 of the primary under a writer -------------------------------------------------------------
        writes, stop = Writes(), threading.Event()
        thread = threading.Thread(target=writer, args=(stub, model, writes, stop), daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(writes.acks) >= 12, "a dozen guarded writes before the kill")
            old_port, new_port = group.primary.port, group.replica.port
            group.primary.kill()
            killed = time.monotonic()
            acked_before_kill = Writes(dict(writes.versions), list(writes.moves))
            promoted = wait_for(
                lambda: all(group.master_port(s) == new_port for s in group.sentinels),
                "every sentinel naming the replica as the primary",
                timeout=FAILOVER_LIMIT_S,
            )
            print(f"the sentinels promoted the replica {promoted:.2f}s after kill -9 of the primary")

            # The new primary has no replica yet: unguarded writes succeed at once, guarded ones say why not.
            def unguarded_write_succeeds() -> bool:
                try:
                    stub.UpdateModel(pb.UpdateModelRequest(name=model, description="after the fail-over"), timeout=10)
                    return True
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    return False

            wait_for(unguarded_write_succeeds, "a write on the new primary", timeout=20)
            carried_on = time.monotonic() - killed
            print(f"the registry wrote on the new primary {carried_on:.2f}s after the kill")

            # The old primary comes back as a replica of the new one (as an operator, or Sentinel, would make it).
            group.primary.replica_of = new_port
            group.primary.start()
            assert group.primary.port == old_port
            wait_for(lambda: in_sync(group.primary), "the old primary in sync as a replica")
            acks_then = len(writes.acks)
            wait_for(lambda: len(writes.acks) >= acks_then + 8, "guarded writes acknowledged again", timeout=30)
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive()
        assert sentinel_registry.process.pid == pid and sentinel_registry.process.poll() is None, "restarted"

        # Failures: only UNAVAILABLE (the state store unreachable, no primary, or no replica's acknowledgement).
        for code, details, _ in writes.failures:
            assert code == grpc.StatusCode.UNAVAILABLE, f"{code.name}: {details}"
            assert "state store" in details, details

        # Nothing acknowledged before the kill is lost; nor after it.
        listed = {v.version: v for v in stub.ListVersions(pb.ListVersionsRequest(model_name=model)).versions}
        lost = [
            rid
            for rid, (number, digest) in writes.versions.items()
            if number not in listed or listed[number].artifact.digest != digest
        ]
        history, token = [], ""
        for _ in range(100):
            request = pb.GetHistoryRequest(model_name=model)
            request.page.page_size, request.page.page_token = 1000, token
            page = stub.GetHistory(request, timeout=10)
            history += page.events
            if not (token := page.page.next_page_token):
                break
        moved = [e.version for e in history if e.type == pb.EVENT_TYPE_ALIAS_SET]
        lost_moves = len(writes.moves) - sum(1 for _ in _in_order(writes.moves, moved))
        lost_before_kill = sum(1 for rid in acked_before_kill.versions if rid in lost) + (
            len(acked_before_kill.moves) - sum(1 for _ in _in_order(acked_before_kill.moves, moved))
        )
        print(
            f"{len(writes.versions)} versions and {len(writes.moves)} alias moves acknowledged "
            f"({len(acked_before_kill.versions)} and {len(acked_before_kill.moves)} before the kill), "
            f"{len(writes.failures)} failed; guarded writes lost: {len(lost) + lost_moves} "
            f"(before the kill: {lost_before_kill})"
        )
        assert not lost and lost_moves == 0 and lost_before_kill == 0
        current = stub.GetModel(pb.GetModelRequest(name=model), timeout=10).aliases["prod"]
        # The alias is where the last acknowledged move put it, or where a later move whose outcome is unknown did.
        assert current == writes.moves[-1] or current in writes.attempted_moves[len(writes.moves) :]
        assert current in listed
    finally:
        channel.close()


def _in_order(expected: list[int], events: list[int]) -> Iterator[int]:
    """The items of `expected` found in `events` as a subsequence (each acknowledged move has its event, in order;
    a move whose outcome was unknown may add events in between)."""
    position = 0
    for item in expected:
        while position < len(events) and events[position] != item:
            position += 1
        if position == len(events):
            return
        yield item
        position += 1
