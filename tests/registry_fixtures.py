"""Fixtures shared by the registry test modules: a real registry subprocess and a small real SavedModel."""

import uuid
from pathlib import Path

import grpc
import numpy as np

from services.clients.registry import RegistryClient
from tests.support import ServiceProcess

MiB = 1024 * 1024


def start_registry(consul_url: str, redis_url: str, data_dir: Path, **settings: str) -> ServiceProcess:
    """A registry subprocess with its own blob dir and Redis key prefix, SERVING when returned."""
    env = {
        "CONSUL_URL": consul_url,
        "REDIS_URL": redis_url,
        "BLOB_DIR": str(data_dir / "blobs"),
        "REDIS_KEY_PREFIX": f"mg:test:{uuid.uuid4().hex[:8]}:",
        "CONSUL_CHECK_INTERVAL": "1s",
        **settings,
    }
    return ServiceProcess("services.registry", "MODELGRID_REGISTRY_", env, data_dir / "registry.log").start()


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def client_for(target: str) -> tuple[grpc.Channel, RegistryClient]:
    channel = grpc.insecure_channel(target)
    return channel, RegistryClient(channel, client_id="pytest")


def build_saved_model(directory: Path, seed: int = 7, busy_loops: int = 0) -> Path:
    """A small real SavedModel: y = relu(x @ w + b), x float32 [batch, 4] -> y float32 [batch, 3]. `seed` picks
    the weights (two versions answer differently); `busy_loops` > 0 adds that many 256x256 matmuls per call, to
    make execution slow enough for queueing tests."""
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
                m = tf.while_loop(lambda i, m: i < busy_loops, lambda i, m: (i + 1, tf.matmul(m, self.busy)),
                                  (tf.constant(0), self.busy))[1]  # fmt: skip
                y = y + 0.0 * tf.reduce_sum(m)
            return {"y": y}

    module = Dense()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory
