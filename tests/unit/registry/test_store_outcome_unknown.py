"""RegistryStore when Redis dies right after EXEC: the change is applied but its reply is lost (redis-py reports a
lost connection under WATCH as a WatchError). The store must not run the change a second time, which would apply it
twice or answer AlreadyExists/FailedPrecondition for a change that was applied: it answers Unavailable with an
outcome-unknown message, and the change is there exactly once. The session's real Redis; no server is killed."""

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from modelgrid.client.errors import Unavailable
from modelgrid.client.registry.types import Artifact, EventType, ModelVersion, RegisteredModel, VersionStatus
from services.kit.redis_client import create_redis
from services.registry.store import RegistryStore

pytestmark = pytest.mark.asyncio(loop_scope="session")


class LosesOneReply:
    """A Redis client whose next MULTI/EXEC (once `arm()`ed) is applied, then fails as redis-py fails when the
    connection drops before the reply: a WatchError raised while handling the ConnectionError."""

    def __init__(self, redis) -> None:
        self._redis = redis
        self._armed = False

    def arm(self) -> None:
        self._armed = True

    def __getattr__(self, name: str):
        return getattr(self._redis, name)

    def pipeline(self, transaction: bool = True):
        pipe = self._redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def execute_then_lose_the_reply(raise_on_error: bool = True):
            watching, stack = pipe.watching, list(pipe.command_stack)
            result = await execute(raise_on_error)
            if self._armed and watching and stack:
                self._armed = False
                try:
                    raise RedisConnectionError("Connection closed by server.")
                except RedisConnectionError:
                    raise WatchError("A ConnectionError occurred while watching one or more keys") from None
            return result

        pipe.execute = execute_then_lose_the_reply
        return pipe


@pytest_asyncio.fixture(loop_scope="session")
async def store(redis_server) -> AsyncIterator[tuple[RegistryStore, LosesOneReply]]:
    redis = create_redis(redis_server.url)
    flaky = LosesOneReply(redis)
    yield RegistryStore(flaky, prefix=f"mg:unit-store:{uuid.uuid4().hex[:8]}:"), flaky
    await redis.aclose()


def _version(name: str) -> ModelVersion:
    return ModelVersion(name, 0, Artifact("ab" * 32, 3), status=VersionStatus.READY, created_by="pytest")


async def test_a_commit_whose_reply_is_lost_is_unavailable_and_applied_once(store):
    store, flaky = store
    name = f"lost-{uuid.uuid4().hex[:8]}"

    flaky.arm()
    with pytest.raises(Unavailable, match="may or may not have been applied") as caught:
        await store.create_model(RegisteredModel(name), "pytest")
    assert "state store (Redis)" in str(caught.value) and "retry" in str(caught.value)
    assert (await store.get_model(name)).name == name  # applied, reported as unknown, not as AlreadyExists

    flaky.arm()
    with pytest.raises(Unavailable):
        await store.commit_version(_version(name), "request-1")
    again, created = await store.commit_version(_version(name), "request-1")  # the retry the message asks for
    assert (again.version, created) == (1, False)
    assert [v.version for v in await store.list_versions(name)] == [1]

    flaky.arm()
    with pytest.raises(Unavailable):
        await store.set_alias(name, "prod", 1, expected=0, actor="pytest")
    assert await store.alias_target(name, "prod") == 1

    history = await store.history(name, "", 100)
    assert [e.type for e in history] == [EventType.MODEL_CREATED, EventType.VERSION_CREATED, EventType.ALIAS_SET]
