"""The other protocols a predictor speaks besides its own API: the Open Inference Protocol (KServe v2, what
tritonclient uses) and TensorFlow Serving's PredictionService and ModelService. Each is a thin servicer over
the same Inference core and ModelControl."""

from collections.abc import Callable

import grpc

from services.predictor.control import ModelControl
from services.predictor.inference import Inference


def protocol_service_names() -> list[str]:
    """Fully-qualified names of the protocol services (for health and reflection)."""
    from services.predictor.protocols import oip, tfserving

    return [*oip.SERVICE_NAMES, *tfserving.SERVICE_NAMES]


def add_protocol_servicers(
    server: grpc.aio.Server, inference: Inference, control: ModelControl, ready: Callable[[], bool]
) -> None:
    """Adds the Open Inference Protocol and TensorFlow Serving servicers to `server`."""
    from services.predictor.protocols import oip, tfserving

    oip.add_to_server(server, inference, control, ready)
    tfserving.add_to_server(server, inference, control)
