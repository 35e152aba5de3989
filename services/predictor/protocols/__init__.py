"""The other protocols a predictor speaks besides its own API: the Open Inference Protocol (KServe v2, what
tritonclient uses) and TensorFlow Serving's PredictionService and ModelService. Each is a thin servicer over
the same Inference core and ModelControl."""

from collections.abc import Callable

import grpc

from services.predictor.control import ModelControl
from services.predictor.inference import Inference
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES
from services.predictor.siblings import Siblings


def protocol_service_names() -> list[str]:
    """Fully-qualified names of the protocol services (for health and reflection)."""
    from services.predictor.protocols import oip, tfserving

    return [*oip.SERVICE_NAMES, *tfserving.SERVICE_NAMES]


def add_protocol_servicers(
    server: grpc.aio.Server,
    inference: Inference,
    control: ModelControl,
    ready: Callable[[], bool],
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    siblings: Siblings | None = None,
) -> None:
    """Adds the Open Inference Protocol and TensorFlow Serving servicers to `server`; `max_request_bytes` bounds
    the decoded input tensors of one request (the predictor's max_request_bytes setting)."""
    from services.predictor.protocols import oip, tfserving

    oip.add_to_server(server, inference, control, ready, max_request_bytes, siblings)
    tfserving.add_to_server(server, inference, control, max_request_bytes)
