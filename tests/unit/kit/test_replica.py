"""The pure parts of a multi-process replica (kit.replica): port reservation, the settings workers get, and the
registration whose health check is the supervisor's."""

import os
import socket

import pytest

from services.kit.consul import Registration
from services.kit.replica import reserve_port
from services.kit.settings import ReplicaSettings


def test_a_reserved_port_is_shared_by_listeners_and_refused_to_others():
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    worker = socket.socket()
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    worker.bind(("127.0.0.1", port))  # a worker joins the port (gRPC sets SO_REUSEPORT on its listeners)
    worker.listen()
    stranger = socket.socket()  # without SO_REUSEPORT: the port is taken
    with pytest.raises(OSError):
        stranger.bind(("127.0.0.1", port))
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        conn, _ = worker.accept()  # the listening worker takes the connection, not the reservation
        conn.close()
    for sock in (reserved, worker, stranger):
        sock.close()


def test_process_count_defaults_to_the_cores_this_process_may_use(tmp_path):
    assert ReplicaSettings(processes=0).process_count() == len(os.sched_getaffinity(0))
    assert ReplicaSettings(processes=3).process_count() == 3
    assert not ReplicaSettings().is_worker and ReplicaSettings(worker_index=0).is_worker


def test_a_worker_finds_its_siblings_sockets_but_not_its_own(tmp_path):
    for index in range(3):
        (tmp_path / f"worker-{index}.sock").touch()
    settings = ReplicaSettings(worker_index=1, control_socket=str(tmp_path / "worker-1.sock"))
    assert settings.sibling_sockets() == [str(tmp_path / "worker-0.sock"), str(tmp_path / "worker-2.sock")]
    assert ReplicaSettings().sibling_sockets() == []


def test_the_registration_of_a_replica_checks_the_supervisor_port():
    plain = Registration("predictor-a", "predictor", "198.18.0.2", 50061).payload()
    assert plain["Port"] == 50061 and plain["Check"]["GRPC"] == "198.18.0.2:50061"
    replica = Registration("predictor-a", "predictor", "198.18.0.2", 50061, check_port=40001).payload()
    assert replica["Port"] == 50061 and replica["Check"]["GRPC"] == "198.18.0.2:40001"
