"""Where a job's replicas go: gang scheduling (all or nothing), spread over the agents with the most free slots."""


def place(workers: int, free: dict[str, int]) -> list[str] | None:
    """Agents for `workers` replicas, spread: each replica goes to the agent with the most free slots left (ties
    by id). None when they do not all fit (gang scheduling: all or nothing)."""
    if sum(free.values()) < workers:
        return None
    left = dict(free)
    chosen = []
    for _ in range(workers):
        agent = min(left, key=lambda a: (-left[a], a))
        if left[agent] <= 0:
            return None
        chosen.append(agent)
        left[agent] -= 1
    return chosen
