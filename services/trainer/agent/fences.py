"""The newest leader epoch an agent has seen of each trainer lock (kit.leader): a call of an older epoch that would
start or stop workers is refused, so a trainer that lost its leadership, and has not noticed yet, cannot act on the
workers the new leader follows. The other calls carry the fence too and teach the agent a newer epoch; they are never
refused.

Kept in memory: an agent that restarts learns the epoch again from the leader's next call. The new leader claims the
job store before it calls any agent, so an agent refusing an old leader never refuses a job the store still lets it
write. Consul's indexes start over only when its data is lost; the agents must then be restarted too, like the job
store's epoch deleted (trainer.store says so when it refuses the claim)."""

from collections import OrderedDict

from modelgrid.agent.v1 import agent_pb2 as pb
from modelgrid.client.errors import Aborted, InvalidArgument

MAX_LOCKS = 64
"""Locks remembered (one per trainer group sharing this agent; tests start many): the one seen least recently goes
first. Forgetting a lock never refuses a call, it only lets an old leader of that lock through again."""
MAX_LOCK_CHARS = 512
"""Longest lock name taken (a Consul KV key; the trainer's LEADER_KEY)."""


class FenceBook:
    """Newest epoch per lock."""

    def __init__(self, max_locks: int = MAX_LOCKS) -> None:
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._max_locks = max_locks

    def note(self, fence: pb.LeaderFence) -> None:
        """Records a read's fence: a newer epoch becomes the lock's newest; an older one is let through."""
        if _checked(fence):
            self._record(fence.lock, fence.epoch)

    def admit(self, fence: pb.LeaderFence) -> None:
        """Records the fence of a call that acts on workers, or raises Aborted when the lock has a newer epoch.
        An unset fence (a caller that does not elect leaders) is admitted."""
        if not _checked(fence):
            return
        newest = self._newest.get(fence.lock, 0)
        if fence.epoch < newest:
            raise Aborted(
                f"a newer trainer leads (epoch {newest} of {fence.lock}, this call's is {fence.epoch}): a deposed "
                "leader may not start or stop workers. (If Consul's data was reset, its indexes start over: restart "
                "this agent.)"
            )
        self._record(fence.lock, fence.epoch)

    def newest(self, lock: str) -> int:
        """The newest epoch seen of `lock` (0: none)."""
        return self._newest.get(lock, 0)

    def _record(self, lock: str, epoch: int) -> None:
        self._newest[lock] = max(epoch, self._newest.get(lock, 0))
        self._newest.move_to_end(lock)
        while len(self._newest) > self._max_locks:
            self._newest.popitem(last=False)


def _checked(fence: pb.LeaderFence) -> bool:
    """Whether the call is fenced; InvalidArgument for a lock name past the bound."""
    if len(fence.lock) > MAX_LOCK_CHARS:
        raise InvalidArgument(f"a leader fence's lock is longer than {MAX_LOCK_CHARS} characters")
    return bool(fence.lock)
