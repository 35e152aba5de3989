"""modelgrid's Python client: typed, sync and asyncio, numpy in and out, no TensorFlow.

    import numpy as np
    from modelgrid.client import PredictorClient, RegistryClient, connect

    with connect("127.0.0.1:8080", api_key="mg_...") as channel:       # the gateway; tls=True, ca=... for TLS
        print(RegistryClient(channel).resolve("digits@production").version)
        answer = PredictorClient(channel).predict("digits@production", {"pixels": np.zeros((1, 64), np.float32)})

- `connect` / `aio_connect`: channels with the API key, TLS, message limits and retries of idempotent calls.
- `RegistryClient` / `AsyncRegistryClient`: models, versions, aliases, artifacts (push and pull with digests).
- `PredictorClient` / `AsyncPredictorClient`: modelgrid's own prediction API and batch jobs.
- `InferenceClient` / `AsyncInferenceClient` (modelgrid.client.oip): the Open Inference Protocol (KServe v2).
- `TrainerClient` / `AsyncTrainerClient`: training jobs.
- `modelgrid.client.errors`: what failed calls raise (NotFound, InvalidArgument, PermissionDenied, ...).
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Retry": "channels",
    "aio_connect": "channels",
    "connect": "channels",
    "ModelgridError": "errors",
    "ModelRef": "modelref",
    "AsyncInferenceClient": "oip",
    "AsyncPredictorClient": "predictor",
    "Inference": "oip",
    "InferenceClient": "oip",
    "Prediction": "predictor",
    "PredictorClient": "predictor",
    "AsyncRegistryClient": "registry",
    "RegistryClient": "registry",
    "AsyncTrainerClient": "trainer",
    "TrainerClient": "trainer",
}
"""What `from modelgrid.client import X` finds, and in which module. Imported on first use: importing one module
(`modelgrid.client.errors`, say) does not load every service's protocol code. That matters for the Open Inference
Protocol's messages (proto package `inference`): tritonclient.grpc defines the same ones, and one process can load
only one of the two."""
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from modelgrid.client.channels import Retry, aio_connect, connect  # noqa: F401
    from modelgrid.client.errors import ModelgridError  # noqa: F401
    from modelgrid.client.modelref import ModelRef  # noqa: F401
    from modelgrid.client.oip import AsyncInferenceClient, Inference, InferenceClient  # noqa: F401
    from modelgrid.client.predictor import AsyncPredictorClient, Prediction, PredictorClient  # noqa: F401
    from modelgrid.client.registry import AsyncRegistryClient, RegistryClient  # noqa: F401
    from modelgrid.client.trainer import AsyncTrainerClient, TrainerClient  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
