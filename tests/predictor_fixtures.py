"""Fixtures for predictor tests: a registry with pushed models and a predictor subprocess in front of it."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from services.kit.localinfra import free_port
from services.kit.modelref import ModelRef
from services.kit.tensors import array_to_tensor, tensor_to_array
from tests.support import ServiceProcess


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


def start_predictor(
    consul_url: str, redis_url: str, data_dir: Path, models: list[dict], **settings: str
) -> ServiceProcess:
    env = {
        "CONSUL_URL": consul_url,
        "REDIS_URL": redis_url,
        "MODELS": json.dumps(models),
        "CACHE_DIR": str(data_dir / "cache"),
        "METRICS_PORT": str(free_port()),
        "CONSUL_CHECK_INTERVAL": "1s",
        "TF_THREADS": "1",
        **settings,
    }
    log = data_dir / f"predictor-{env['METRICS_PORT']}.log"
    return ServiceProcess("services.predictor", "MODELGRID_PREDICTOR_", env, log).start(timeout=120)


def predict_request(ref: str, x: np.ndarray, **inputs: np.ndarray) -> pb.PredictRequest:
    parsed = ModelRef.parse(ref)
    model = common_pb2.ModelRef(name=parsed.name)
    if parsed.version:
        model.version = parsed.version
    elif parsed.alias:
        model.alias = parsed.alias
    tensors = {"x": array_to_tensor(x), **{k: array_to_tensor(v) for k, v in inputs.items()}}
    return pb.PredictRequest(model=model, inputs=tensors)


def predict(stub: predictor_pb2_grpc.PredictorStub, ref: str, x: np.ndarray, timeout: float = 30):
    """(version, y) of one Predict call."""
    reply = stub.Predict(predict_request(ref, x), timeout=timeout)
    return reply.version, tensor_to_array(reply.outputs["y"])


def channel_to(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target)
