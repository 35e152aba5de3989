"""Which model a predictor call is for, read from its first request message, and how to send it to another
alias. One table per protocol: the paths of field numbers of the model name and of the alias (or version label)."""

from services.gateway.wire import strings_at, with_string

# method -> (path of the model name, path of the alias-like field)
_MODEL_FIELDS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # modelgrid.predictor.v1: PredictRequest.model (ModelRef: name = 1, alias = 3)
    "/modelgrid.predictor.v1.Predictor/Predict": ((1, 1), (1, 3)),
    # PredictStreamRequest.request (PredictRequest) .model
    "/modelgrid.predictor.v1.Predictor/PredictStream": ((2, 1, 1), (2, 1, 3)),
    "/modelgrid.predictor.v1.Predictor/GetModelMetadata": ((1,), ()),
    # Open Inference Protocol: model_name = 1, model_version = 2 (a non-numeric version is an alias)
    "/inference.GRPCInferenceService/ModelInfer": ((1,), (2,)),
    "/inference.GRPCInferenceService/ModelStreamInfer": ((1,), (2,)),
    "/inference.GRPCInferenceService/ModelMetadata": ((1,), (2,)),
    "/inference.GRPCInferenceService/ModelReady": ((1,), (2,)),
    # TensorFlow Serving: model_spec = 1 (ModelSpec: name = 1, version_label = 4)
    "/tensorflow.serving.PredictionService/Predict": ((1, 1), (1, 4)),
    "/tensorflow.serving.PredictionService/GetModelMetadata": ((1, 1), (1, 4)),
    "/tensorflow.serving.ModelService/GetModelStatus": ((1, 1), (1, 4)),
}


def _read_at(name: tuple[int, ...], alias: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the message holding both fields, their numbers in it): both are read in one pass."""
    if alias and alias[:-1] != name[:-1]:
        raise ValueError(f"model name {name} and alias {alias} are not fields of one message")
    return name[:-1], (name[-1], alias[-1]) if alias else (name[-1],)


_READ_AT = {method: _read_at(*paths) for method, paths in _MODEL_FIELDS.items()}

# Calls whose alias may be redirected to the canary (predictions, not metadata).
_REDIRECTABLE = {
    "/modelgrid.predictor.v1.Predictor/Predict",
    "/inference.GRPCInferenceService/ModelInfer",
    "/tensorflow.serving.PredictionService/Predict",
}


def model_of(method: str, first_request: bytes | None) -> tuple[str, str]:
    """(model name, alias) of a predictor call, ("", "") when the method names no model or cannot be read."""
    fields = _READ_AT.get(method)
    if fields is None or not first_request:
        return "", ""
    parent, numbers = fields
    try:
        strings = strings_at(first_request, parent, numbers)
    except ValueError:
        return "", ""  # malformed: the backend will say so
    return strings[0], strings[1] if len(strings) > 1 else ""


def redirect_to_alias(method: str, request: bytes, alias: str) -> bytes:
    """The request with its alias replaced (only for prediction calls; others are returned unchanged)."""
    if method not in _REDIRECTABLE:
        return request
    return with_string(request, _MODEL_FIELDS[method][1], alias)
