"""modelgrid's Python client: typed, sync and asyncio, numpy in and out, no TensorFlow.

    import numpy as np
    from modelgrid.client import PredictorClient, RegistryClient, connect

    with connect("127.0.0.1:8080", api_key="mg_...") as channel:       # the gateway; tls=True, ca=... for TLS
        print(RegistryClient(channel).resolve("digits@production").version)
        answer = PredictorClient(channel).predict("digits@production", {"pixels": np.zeros((1, 64), np.float32)})

- `connect` / `aio_connect`: channels with the API key, TLS, message limits and retries of idempotent calls.
- `RegistryClient` / `AsyncRegistryClient`: models, versions, aliases, artifacts (push and pull with digests).
- `PredictorClient` / `AsyncPredictorClient`: modelgrid's own prediction API and batch jobs.
- `InferenceClient` / `AsyncInferenceClient`: the Open Inference Protocol (KServe v2).
- `TrainerClient` / `AsyncTrainerClient`: training jobs.
- `modelgrid.client.errors`: what failed calls raise (NotFound, InvalidArgument, PermissionDenied, ...).
"""

from modelgrid.client.channels import Retry, aio_connect, connect
from modelgrid.client.errors import ModelgridError
from modelgrid.client.modelref import ModelRef
from modelgrid.client.predictor import (
    AsyncInferenceClient,
    AsyncPredictorClient,
    Inference,
    InferenceClient,
    Prediction,
    PredictorClient,
)
from modelgrid.client.registry import AsyncRegistryClient, RegistryClient
from modelgrid.client.trainer import AsyncTrainerClient, TrainerClient

__all__ = [
    "AsyncInferenceClient",
    "AsyncPredictorClient",
    "AsyncRegistryClient",
    "AsyncTrainerClient",
    "Inference",
    "InferenceClient",
    "ModelRef",
    "ModelgridError",
    "Prediction",
    "PredictorClient",
    "RegistryClient",
    "Retry",
    "TrainerClient",
    "aio_connect",
    "connect",
]
