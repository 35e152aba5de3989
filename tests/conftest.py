"""Shared fixtures: one real Consul agent and one real Redis server per test session, on free ports."""

import os
from collections.abc import Iterator

import pytest

from services.kit.localinfra import ConsulAgent, RedisServer

# Keep TensorFlow quiet and on the CPU in every process the tests start.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def consul(tmp_path_factory) -> Iterator[ConsulAgent]:
    with ConsulAgent(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
