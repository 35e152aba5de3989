"""Exit codes of a training worker process, and how the trainer describes an exit. One module for both sides: the
worker exits with these, the trainer's runner decides from them whether a restart can help."""

import enum
import signal


class ExitCode(enum.IntEnum):
    """What a worker's exit status means."""

    OK = 0
    """Training finished (and the chief exported the model)."""
    FAILED = 1
    """Anything else went wrong, typically a peer was lost; restart the whole group from the last backup."""
    INVALID_SPEC = 2
    """The spec, recipe or data set is unusable; restarting will not help."""
    INJECTED_CRASH = 3
    """The `crash_at_step` testing aid fired."""
    NO_DATA = 4
    """Set by the agent, not a worker: it could not fetch the replica's data set or checkpoint from the registry
    (unavailable for longer than it waits), so the worker never started; restart the group."""
    PREEMPTED = 42
    """SIGTERM: the group agreed on a step, saved a backup there and stopped; relaunch to resume at that step (a
    preemption does not spend the restart budget)."""


def describe_exit(code: int) -> str:
    """An exit status for people: "code 3", or "signal 9 (SIGKILL)" for a negative status."""
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
