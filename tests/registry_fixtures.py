"""Fixtures shared by the registry test modules: a real registry subprocess and a small real SavedModel."""

import uuid
from pathlib import Path

import grpc
import numpy as np

from services.registry.client import RegistryClient
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


def build_saved_model(directory: Path) -> Path:
    """A small real SavedModel: y = relu(x @ w + b), x float32 [batch, 4] -> y float32 [batch, 3]."""
    import tensorflow as tf

    class Dense(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(7)
            self.w = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))
            self.b = tf.Variable(np.zeros(3, dtype="float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.relu(tf.matmul(x, self.w) + self.b)}

    module = Dense()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory
