"""Which model a predictor call is for, read from its first request message, and how to send it to another
alias. One table per protocol: the paths of field numbers of the model name and of the alias (or version label)."""

from services.gateway.wire import string_at, with_string

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

# Calls whose alias may be redirected to the canary (predictions, not metadata).
_REDIRECTABLE = {
    "/modelgrid.predictor.v1.Predictor/Predict",
    "/inference.GRPCInferenceService/ModelInfer",
    "/tensorflow.serving.PredictionService/Predict",
}


def model_of(method: str, first_request: bytes | None) -> tuple[str, str]:
    """(model name, alias) of a predictor call, ("", "") when the method names no model or cannot be read."""
    fields = _MODEL_FIELDS.get(method)
    if fields is None or not first_request:
        return "", ""
    name_path, alias_path = fields
    try:
        return string_at(first_request, name_path), string_at(first_request, alias_path) if alias_path else ""
    except ValueError:
        return "", ""  # malformed: the backend will say so


def redirect_to_alias(method: str, request: bytes, alias: str) -> bytes:
    """The request with its alias replaced (only for prediction calls; others are returned unchanged)."""
    if method not in _REDIRECTABLE:
        return request
    return with_string(request, _MODEL_FIELDS[method][1], alias)
