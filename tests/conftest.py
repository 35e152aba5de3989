"""Fixtures of every tier: one real Consul agent and one real Redis server per test session on free ports, unique
names, a small real SavedModel, and (for tests/integration and tests/e2e) the launcher of modelgrid services as
real subprocesses.

Tests reach these helpers through fixtures only; nothing under tests/ is imported as a module.
"""

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest

from modelgrid.client.registry import RegistryClient
from modelgrid.trainer.v1 import trainer_pb2
from services.kit import tls
from services.kit.localinfra import ConsulAgent, RedisServer, free_port, service_token
from services.kit.processes import REPO_ROOT, ServiceProcess

# Keep TensorFlow quiet and on the CPU in every process the tests start.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"


def pytest_configure(config) -> None:
    """One Consul master token for every ConsulAgent the session starts (they run with ACLs, default deny), set
    before any starts; in-process ConsulClients given no token fall back to it. Services the launcher starts get a
    token of their own (service_token)."""
    os.environ["CONSUL_HTTP_TOKEN"] = str(uuid.uuid4())


# -- infrastructure --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def internal_tls_dir(tmp_path_factory) -> Path:
    """The mesh's CA and a certificate per service (kit.tls), as `make up` makes them: the services the launcher
    starts use mTLS among themselves, the Consul agents check them with the `consul` certificate, and tests call
    them as `operator` (ServiceProcess.channel)."""
    return tls.init(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def consul(tmp_path_factory, internal_tls_dir) -> Iterator[ConsulAgent]:
    with ConsulAgent(tmp_path_factory.mktemp("consul"), tls_dir=internal_tls_dir) as agent:
        yield agent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


# -- names and models ------------------------------------------------------------------------------------------


def _unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def unique() -> Callable[..., str]:
    """`unique(prefix="m")`: a model name (or key) no other test uses, `<prefix>-<10 hex digits>`."""
    return _unique


def _build_saved_model(directory: Path, seed: int = 7, busy_loops: int = 0) -> Path:
    import tensorflow as tf

    class Dense(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(seed)
            self.w = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))
            self.b = tf.Variable(rng.normal(size=3).astype("float32"))
            self.busy = tf.Variable(np.eye(256, dtype="float32") * 0.5)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            y = tf.nn.relu(tf.matmul(x, self.w) + self.b)
            if busy_loops:

                def step(i, m):
                    return i + 1, tf.matmul(m, self.busy)

                m = tf.while_loop(lambda i, m: i < busy_loops, step, (tf.constant(0), self.busy))[1]
                y = y + 0.0 * tf.reduce_sum(m)
            return {"y": y}

    module = Dense()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


@pytest.fixture(scope="session")
def build_saved_model() -> Callable[..., Path]:
    """`build_saved_model(directory, seed=7, busy_loops=0) -> directory`: a small real SavedModel,
    y = relu(x @ w + b), x float32 [batch, 4] -> y float32 [batch, 3]. `seed` picks the weights (two versions answer
    differently); `busy_loops` > 0 adds that many 256x256 matmuls per call, to make execution slow enough for
    queueing tests."""
    return _build_saved_model


@dataclass
class Reference:
    """A SavedModel loaded in the test process: what TensorFlow itself answers."""

    path: Path
    _fn: object = field(default=None, repr=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._fn is None:
            import tensorflow as tf

            self._fn = tf.saved_model.load(str(self.path)).signatures["serving_default"]
        return self._fn(x=x)["y"].numpy()


@pytest.fixture(scope="session")
def tf_reference() -> Callable[[Path], Reference]:
    """`tf_reference(path)(x) -> y`: what TensorFlow in the test process answers for the SavedModel at `path`."""
    return Reference


def _digits_spec(**overrides) -> trainer_pb2.JobSpec:
    spec = trainer_pb2.JobSpec(
        name="digits-mlp",
        recipe="mlp",
        dataset=trainer_pb2.Dataset(local_path=str(DIGITS_NPZ), format="npz", features_key="x", label_key="y"),
        hyper_parameters=trainer_pb2.HyperParameters(
            epochs=8, batch_size=32, learning_rate=0.01, optimizer="adam", validation_split=0.2, seed=1
        ),
        workers=2,
        checkpoint_every_steps=5,
        max_restarts=2,
        report_every_steps=5,
    )
    spec.recipe_params.update({"hidden_units": [64]})
    for key, value in overrides.items():
        if isinstance(value, list):
            getattr(spec, key).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(spec, key).CopyFrom(value)
        else:
            setattr(spec, key, value)
    return spec


@pytest.fixture(scope="session")
def digits_spec() -> Callable[..., trainer_pb2.JobSpec]:
    """`digits_spec(**overrides) -> JobSpec`: a small MLP on the shipped digits data set (data/digits), two
    workers; an override replaces a field (a list extends it, a message is copied in)."""
    return _digits_spec


# -- clients ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def client_for(internal_tls_dir) -> Callable[[ServiceProcess | str], tuple[grpc.Channel, RegistryClient]]:
    """`channel, client = client_for(registry)`: a sync registry client over a new channel (the caller closes it),
    as `operator` over mTLS; `registry` is a ServiceProcess or the host:port of a registry using the session's
    certificates."""

    def client_for(registry: ServiceProcess | str) -> tuple[grpc.Channel, RegistryClient]:
        if isinstance(registry, ServiceProcess):
            channel = registry.channel()
        else:
            channel = tls.dial(registry, "registry", tls.InternalTLS(internal_tls_dir, "operator"))
        return channel, RegistryClient(channel, client_id="pytest")

    return client_for


@dataclass
class PredictionLoop:
    """Calls of `predict()` one after another in a thread, recording each outcome, until the block ends or a
    bound is reached (chaos and multi-host tests run one across a fault)."""

    MAX_SECONDS: ClassVar[float] = 300.0  # no loop runs longer, whatever happens
    MAX_CALLS: ClassVar[int] = 50_000

    predict: Callable[[], Any]  # a call whose reply has a `version` (PredictResponse)
    results: list[tuple[float, str, int]] = field(default_factory=list)  # (time.monotonic(), code name, version)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "PredictionLoop":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < PredictionLoop.MAX_SECONDS:
            if len(self.results) >= PredictionLoop.MAX_CALLS:
                break
            try:
                reply = self.predict()
                self.results.append((time.monotonic(), "OK", reply.version))
            except grpc.RpcError as err:
                self.results.append((time.monotonic(), err.code().name, 0))
            time.sleep(0.01)

    def failures(self) -> Counter:
        return Counter(code for _, code, _ in self.results if code != "OK")

    def calls(self) -> int:
        return len(self.results)


@pytest.fixture(scope="session")
def prediction_loop() -> type[PredictionLoop]:
    """`with prediction_loop(lambda: stub.Predict(...)) as loop: ...` then `loop.calls()`, `loop.failures()`."""
    return PredictionLoop


# -- services as subprocesses ----------------------------------------------------------------------------------


class ServiceLauncher:
    """Starts modelgrid services as real subprocesses on free ports, SERVING when returned; stops whatever is
    still running when the fixture ends (newest first). Tests may stop (or kill) a process themselves earlier:
    a fixture with its own Consul agent stops its services before leaving the agent's `with` block."""

    def __init__(self, internal_tls_dir: Path | None = None) -> None:
        self.internal_tls_dir = internal_tls_dir
        self.started: list[ServiceProcess] = []
        self._pending: list[tuple[ServiceProcess, float]] | None = None

    def start(self, process: ServiceProcess, timeout: float = 60.0) -> ServiceProcess:
        """Starts any ServiceProcess and keeps it for the final stop (inside `together()`: without waiting)."""
        self.started.append(process)
        if self._pending is None:
            return process.start(timeout)
        self._pending.append((process, timeout))
        return process.spawn()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Services started in this block start side by side (each pays its imports, TensorFlow's included, at the
        same time as the others); the block ends when all of them are SERVING. Start in it only services that do
        not need each other to come up."""
        self._pending = []
        try:
            yield
            for process, timeout in self._pending:
                process.wait_ready(timeout)
        finally:
            self._pending = None

    def registry(self, consul_url: str, redis_url: str, data_dir: Path, **settings: str) -> ServiceProcess:
        """A registry with its own blob dir (in `data_dir`) and Redis key prefix."""
        env = {
            "CONSUL_URL": consul_url,
            "CONSUL_TOKEN": service_token(consul_url, "registry"),
            "REDIS_URL": redis_url,
            "BLOB_DIR": str(data_dir / "blobs"),
            "REDIS_KEY_PREFIX": f"mg:test:{uuid.uuid4().hex[:8]}:",
            "CONSUL_CHECK_INTERVAL": "1s",
            **settings,
        }
        return self.start(
            ServiceProcess(
                "services.registry",
                "MODELGRID_REGISTRY_",
                env,
                data_dir / "registry.log",
                internal_tls_dir=self.internal_tls_dir,
            )
        )

    def predictor(
        self, consul_url: str, redis_url: str, data_dir: Path, models: list[dict], **settings: str
    ) -> ServiceProcess:
        """A predictor serving `models` (the MODELS setting), its cache in `data_dir`, one TensorFlow thread."""
        env = {
            "CONSUL_URL": consul_url,
            "CONSUL_TOKEN": service_token(consul_url, "predictor"),
            "REDIS_URL": redis_url,
            "MODELS": json.dumps(models),
            "CACHE_DIR": str(data_dir / "cache"),
            "METRICS_PORT": str(free_port()),
            "CONSUL_CHECK_INTERVAL": "1s",
            "TF_THREADS": "1",
            **settings,
        }
        log = data_dir / f"predictor-{env['METRICS_PORT']}.log"
        return self.start(
            ServiceProcess(
                "services.predictor", "MODELGRID_PREDICTOR_", env, log, internal_tls_dir=self.internal_tls_dir
            ),
            timeout=120,
        )

    def agent(self, consul_url: str, data_dir: Path, slots: int = 1) -> ServiceProcess:
        """A worker agent with `slots` slots and its own work dir in `data_dir`."""
        name = f"agent-{uuid.uuid4().hex[:6]}"
        env = {
            "CONSUL_URL": consul_url,
            "CONSUL_TOKEN": service_token(consul_url, "trainer-agent"),
            "SLOTS": str(slots),
            "WORK_DIR": str(data_dir / name),
            "CONSUL_CHECK_INTERVAL": "1s",
            "CONSUL_DEREGISTER_AFTER": "1m",
        }
        return self.start(
            ServiceProcess(
                "services.trainer.agent",
                "MODELGRID_AGENT_",
                env,
                data_dir / f"{name}.log",
                internal_tls_dir=self.internal_tls_dir,
            )
        )

    def trainer(self, consul_url: str, redis_url: str, data_dir: Path, prefix: str, **settings: str) -> ServiceProcess:
        """A trainer with Redis key prefix `prefix`, its shared and recipes dirs in `data_dir`."""
        env = {
            "CONSUL_URL": consul_url,
            "CONSUL_TOKEN": service_token(consul_url, "trainer"),
            "REDIS_URL": redis_url,
            "SHARED_DIR": str(data_dir / "shared"),
            "RECIPES_DIR": str(data_dir / "recipes"),
            "DATASET_ROOTS": json.dumps([str(DIGITS_NPZ.parent)]),  # digits_spec names the shipped data by path
            "REDIS_KEY_PREFIX": prefix,
            # Trainers sharing the prefix elect one leader; those of other tests elect theirs apart.
            "LEADER_KEY": "modelgrid/trainer/" + "".join(c if c.isalnum() else "-" for c in prefix).strip("-"),
            "RECORD_SHARD_IDS": "true",
            "RESTART_BACKOFF_SECONDS": "0.2",
            "CONSUL_CHECK_INTERVAL": "1s",
            **settings,
        }
        (data_dir / "recipes").mkdir(parents=True, exist_ok=True)
        return self.start(
            ServiceProcess(
                "services.trainer",
                "MODELGRID_TRAINER_",
                env,
                data_dir / "trainer.log",
                internal_tls_dir=self.internal_tls_dir,
            )
        )

    def gateway(
        self,
        consul_url: str,
        redis_url: str,
        data_dir: Path,
        root_certificates: bytes | None = None,
        **settings: str | None,
    ) -> ServiceProcess:
        """A gateway without its web front (unless WEB_PORT is given), ejecting a failed upstream for 5 s. Auth is
        off unless AUTH_ENABLED says otherwise (the tests of auth say so; None leaves a setting at its default);
        its admin key file is in `data_dir`. With TLS_CERT and TLS_KEY its public port speaks TLS, and
        `root_certificates` (the CA's PEM) is what the readiness check trusts."""
        env = {
            "CONSUL_URL": consul_url,
            "CONSUL_TOKEN": service_token(consul_url, "gateway"),
            "REDIS_URL": redis_url,
            "WEB_PORT": "-1",
            "METRICS_PORT": "0",
            "EJECT_SECONDS": "5",
            "CONSUL_CHECK_INTERVAL": "1s",
            "AUTH_ENABLED": "false",
            "ADMIN_KEY_FILE": str(data_dir / f"admin-key-{uuid.uuid4().hex[:6]}"),
            **settings,
        }
        env = {key: value for key, value in env.items() if value is not None}
        log = data_dir / f"gateway-{free_port()}.log"
        return self.start(
            ServiceProcess(
                "services.gateway",
                "MODELGRID_GATEWAY_",
                env,
                log,
                root_certificates=root_certificates,
                internal_tls_dir=self.internal_tls_dir,
            )
        )

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()


@pytest.fixture(scope="module")
def launch(internal_tls_dir) -> Iterator[ServiceLauncher]:
    """`launch.registry(...)`, `.predictor(...)`, `.agent(...)`, `.trainer(...)`, `.gateway(...)`,
    `.start(ServiceProcess(...))`: services as subprocesses with the session's internal TLS, stopped at the end of
    the module at the latest."""
    launcher = ServiceLauncher(internal_tls_dir)
    yield launcher
    launcher.stop_all()
