"""Ports reserved per job on an agent's host, the same ones for the job's whole life (and across agent restarts).

The trainer puts them into TF_CONFIG with the agent's advertised address (its Consul registration), which is where
the other workers connect. A port is checked free on every address of the host (bound to 0.0.0.0), because that is
where TensorFlow's gRPC server listens; a port free there is free on the advertised address too."""

import contextlib
import itertools
import json
import os
import socket
from pathlib import Path

from modelgrid.client.errors import ResourceExhausted


class PortReservations:
    """Ports reserved per job on this host, kept in a JSON file so that a restarted agent hands out the same."""

    def __init__(self, path: Path, range_start: int, range_end: int) -> None:
        self._path = path
        self._range = (range_start, range_end)
        raw = json.loads(path.read_text()) if path.exists() else {}
        self._jobs: dict[str, list[int]] = {str(job): [int(p) for p in ports] for job, ports in raw.items()}

    def reserve(self, job_id: str, count: int) -> list[int]:
        """The job's first `count` ports: the same on every call; extended with free ports when it asks for more."""
        ports = self._jobs.get(job_id, [])
        if len(ports) < count:
            ports = ports + self._pick(count - len(ports))
        ports = ports[:count]
        if ports != self._jobs.get(job_id):
            self._jobs[job_id] = ports
            self._save()
        return list(ports)

    def release(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            self._save()

    def _pick(self, count: int) -> list[int]:
        taken = {port for ports in self._jobs.values() for port in ports}
        start, end = self._range
        if start:
            candidates = (p for p in range(start, end + 1) if p not in taken and _bindable(p))
            chosen = list(itertools.islice(candidates, count))
            if len(chosen) < count:
                raise ResourceExhausted(f"fewer than {count} free ports left in {start}-{end} on this agent")
            return chosen
        chosen = []
        with contextlib.ExitStack() as held:  # every chosen socket stays bound until all are chosen: no repeats
            for _ in range(4 * count + 32):
                sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("", 0))
                port = sock.getsockname()[1]
                if port not in taken:
                    chosen.append(port)
                if len(chosen) == count:
                    return chosen
        raise ResourceExhausted(f"could not find {count} free ports on this agent")

    def _save(self) -> None:
        partial = self._path.with_name(self._path.name + ".partial")
        partial.write_text(json.dumps(self._jobs, indent=1, sort_keys=True))
        os.replace(partial, self._path)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True
