"""KServe v2 (Open Inference Protocol) REST bodies <-> the OIP gRPC messages the predictors speak, as pure functions.

An infer request is JSON (`id`, `parameters`, `inputs: [{name, shape, datatype, data}]`, `outputs`), optionally
followed by binary tensor data (the binary tensor data extension: the `Inference-Header-Content-Length` header
says how long the JSON is; each input with `parameters.binary_data_size` takes that many bytes after it, in input
order). `data` may be flat (row-major) or nested as the shape says. Every input goes upstream in
`raw_input_contents`, whatever it came as, so the predictor checks one form. An output goes back as JSON `data` or,
when asked (`outputs[].parameters.binary_data`, or `parameters.binary_data_output` for every output not naming its
own choice), as binary data after the JSON, the response's `Inference-Header-Content-Length` saying where it starts.

Bounds come before allocation: the JSON's size, then an upper bound of the number of values it holds (counted from
its commas and brackets, before it is parsed), then each input's declared shape against its data.

The messages are looked up by name in the process's descriptor pool rather than imported: the gateway's main
imports the project's `inference` package, while a test process may hold tritonclient's copy of the same proto
file (the two cannot both load in one pool); either serves.
"""

import functools
import importlib
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from google.protobuf import descriptor_pool, message_factory

from modelgrid.client.errors import InvalidArgument, ResourceExhausted
from modelgrid.client.tensors import BY_OIP, ElementType, decode_strings, element_count, input_label, raw_of

MESSAGES = (
    "ServerLiveRequest ServerLiveResponse ServerReadyRequest ServerReadyResponse ServerMetadataRequest "
    "ServerMetadataResponse ModelMetadataRequest ModelMetadataResponse ModelReadyRequest ModelReadyResponse "
    "ModelInferRequest ModelInferResponse InferParameter"
).split()
BINARY_EXTENSION = "binary_tensor_data"
_WBITS = {"gzip": 31, "deflate": 15, "x-gzip": 31}
"""zlib's wbits of each Content-Encoding tritonclient.http can send (its `deflate` is zlib-wrapped)."""
_INT64_MAX = 2**63 - 1
_INT_LIMIT = 2**64


class PayloadTooLarge(ResourceExhausted):
    """A request over one of the REST limits (HTTP 413): not retryable as it is, unlike a rate limit (429)."""


@functools.cache
def messages() -> SimpleNamespace:
    """The OIP message classes by name (see the module docstring for why they are looked up)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName("inference.ModelInferRequest")
    except KeyError:
        importlib.import_module("modelgrid.oip.grpc_service_pb2")
    return SimpleNamespace(
        **{name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}")) for name in MESSAGES}
    )


@dataclass(frozen=True)
class JsonLimits:
    """The REST front's bounds (GatewaySettings.oip_rest_*)."""

    max_json_bytes: int
    max_json_values: int
    max_request_bytes: int


@dataclass(frozen=True)
class InferCall:
    """A parsed infer request: the message for the predictor, and how the caller wants each output back."""

    request: object  # inference.ModelInferRequest
    binary_outputs: Mapping[str, bool]  # output name -> its own binary_data choice
    binary_default: bool  # parameters.binary_data_output

    def binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


# -- requests --------------------------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A request body sent with Content-Encoding gzip or deflate, inflated to at most `max_bytes` (a small body
    must not inflate to any size): PayloadTooLarge beyond, InvalidArgument when it is not what it says."""
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidArgument(f"Content-Encoding {encoding[:32]!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        raise InvalidArgument(f"the request body is not valid {encoding.strip().lower()} data") from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the request body inflates to more than {max_bytes} bytes (MODELGRID_GATEWAY_WEB_MAX_BODY_BYTES)"
        )
    if not inflater.eof:
        raise InvalidArgument(f"the request body ends inside its {encoding.strip().lower()} data")
    return data


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary data) of a body, by the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not (value.isascii() and value.isdigit()) or int(value) > len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length must be the byte length of the JSON at the start of the body "
            f"(0 to {len(body)}); got {value[:32]!r}"
        )
    return body[: int(value)], body[int(value) :]


def _load_json(header: bytes, limits: JsonLimits) -> dict:
    """The JSON object of a request, its size and its number of values checked before it is parsed."""
    if len(header) > limits.max_json_bytes:
        raise PayloadTooLarge(
            f"the request's JSON is {len(header)} bytes, more than the limit of {limits.max_json_bytes} "
            "(MODELGRID_GATEWAY_OIP_REST_MAX_JSON_BYTES); send tensors as binary data "
            "(Inference-Header-Content-Length)"
        )
    # Each value after the first one of an array or object follows a comma, and each array or object opens once:
    # a bound of the values json.loads would build, counted in C before it builds any.
    values = header.count(b",") + header.count(b"[") + header.count(b"{")
    if values > limits.max_json_values:
        raise PayloadTooLarge(
            f"the request's JSON holds up to {values} values, more than the limit of {limits.max_json_values} "
            "(MODELGRID_GATEWAY_OIP_REST_MAX_JSON_VALUES); send tensors as binary data "
            "(Inference-Header-Content-Length)"
        )
    try:
        document = json.loads(header.decode())
    except UnicodeDecodeError:
        raise InvalidArgument("the request's JSON is not UTF-8 text") from None
    except json.JSONDecodeError as exc:  # its message says where, never what: nothing of the body is repeated
        raise InvalidArgument(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidArgument("the request's JSON nests too deeply") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object with `inputs`")
    return document


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict, key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{what}: parameter {key!r} must be true or false")
    return value


def _parameter(value: object, what: str):
    """An InferParameter of a JSON scalar."""
    parameter = messages().InferParameter()
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int) and -_INT64_MAX - 1 <= value <= _INT64_MAX:
        parameter.int64_param = value
    elif isinstance(value, int) and 0 <= value < _INT_LIMIT:
        parameter.uint64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise InvalidArgument(f"{what} must be a boolean, a 64-bit integer, a number or a string")
    return parameter


def _shape(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"{what}: `shape` must be a list of integers")
    element_count(value, what)  # negative, too many dimensions, more elements than any tensor holds
    return value


def flatten(data: object, shape: list[int], what: str) -> list:
    """The values of `data` in row-major order: `data` is either flat (as many values as the shape holds) or
    nested exactly as the shape says. InvalidArgument otherwise, naming what does not match."""
    count = element_count(shape, what)
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: `data` must be a list (flat, or nested as the shape)")
    if all(not isinstance(item, list) for item in data):  # flat
        if len(data) != count:
            raise InvalidArgument(f"{what}: {len(data)} values in `data` do not match shape {shape} ({count} elements)")
        return data
    level = [data]
    for depth, dim in enumerate(shape):
        below = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                raise InvalidArgument(f"{what}: nested `data` does not match shape {shape} at depth {depth}")
            below.extend(item)
        level = below
    if any(isinstance(item, list) for item in level):
        raise InvalidArgument(f"{what}: nested `data` is deeper than shape {shape}")
    return level


def raw_from_values(values: list, datatype: str, element: ElementType, what: str) -> bytes:
    """The raw little-endian bytes (BYTES: 4-byte length, then the bytes, per element) of JSON values."""
    if element.name == "string":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"{what}: BYTES elements in JSON must be strings")
        encoded = [v.encode() for v in values]
        return b"".join(struct.pack("<I", len(b)) + b for b in encoded)
    if element.numpy is None:
        raise InvalidArgument(f"{what}: {datatype} cannot be written in JSON; send it as binary data")
    target = element.numpy.kind
    try:
        array = np.array(values)  # numpy's own type for the JSON values: bool, int64, uint64, float64, or not numbers
    except (ValueError, OverflowError):
        array = np.array([None])
    kind = array.dtype.kind
    if target in "iu" and kind in "fO" and all(type(v) is int for v in values):
        array = _wide_integers(values, element, datatype, what)  # int64 and uint64 values together: no common type
    elif array.size and not (
        kind == target == "b" or (target in "iu" and kind in "iu") or (target == "f" and kind in "iuf")
    ):
        expected = {"b": "true or false", "i": "integers", "u": "integers"}.get(target, "numbers")
        raise InvalidArgument(f"{what}: {datatype} elements must be {expected}")
    if target in "iu" and array.size:
        limits = np.iinfo(element.numpy)
        if int(array.min()) < limits.min or int(array.max()) > limits.max:
            raise InvalidArgument(f"{what}: values outside the {datatype} range [{limits.min}, {limits.max}]")
    return raw_of(array.astype(element.numpy))


def _wide_integers(values: list, element: ElementType, datatype: str, what: str) -> np.ndarray:
    """Integers numpy has no one type for (some past int64, some negative), converted to the tensor's own type."""
    try:
        return np.array(values, dtype=element.numpy)
    except OverflowError:
        limits = np.iinfo(element.numpy)
        raise InvalidArgument(f"{what}: values outside the {datatype} range [{limits.min}, {limits.max}]") from None


def _binary_input(binary: bytes, offset: int, size: object, shape: list[int], element: ElementType, what: str) -> bytes:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: `binary_data_size` must be a non-negative integer")
    if offset + size > len(binary):
        raise InvalidArgument(
            f"{what}: binary_data_size {size} runs past the end of the binary data ({len(binary)} bytes after the JSON)"
        )
    count = element_count(shape, what)
    if element.numpy is not None and size != count * element.numpy.itemsize:
        raise InvalidArgument(
            f"{what}: {size} bytes of binary data do not match shape {shape} of {element.oip} "
            f"({count * element.numpy.itemsize} bytes)"
        )
    if element.name == "string" and size < 4 * count:
        raise InvalidArgument(f"{what}: {size} bytes cannot hold {count} BYTES elements (4-byte length each)")
    return binary[offset : offset + size]


def parse_infer(body: bytes, header_length: str | None, model: str, version: str, limits: JsonLimits) -> InferCall:
    """The predictor's ModelInferRequest for a REST infer body, checked; InvalidArgument (400) or PayloadTooLarge
    (413) with what is wrong."""
    header, binary = _split(body, header_length)
    document = _load_json(header, limits)
    request = messages().ModelInferRequest(model_name=model, model_version=version)
    if (request_id := document.get("id")) is not None:
        if not isinstance(request_id, str):
            raise InvalidArgument("`id` must be a string")
        request.id = request_id
    parameters = _object(document.get("parameters"), "`parameters`")
    binary_default = bool(_flag(parameters, "binary_data_output", "the request"))
    for key, value in parameters.items():
        if key != "binary_data_output":
            request.parameters[key].CopyFrom(_parameter(value, f"parameter {key!r}"))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("`inputs` must be a non-empty list of tensors ({name, shape, datatype, data})")
    offset, seen = 0, set()
    for i, tensor in enumerate(inputs):
        tensor = _object(tensor, f"input #{i}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"input #{i} has no name")
        what = input_label(name)
        if name in seen:
            raise InvalidArgument(f"{what} appears more than once")
        seen.add(name)
        datatype = tensor.get("datatype")
        element = BY_OIP.get(datatype) if isinstance(datatype, str) else None
        if element is None:
            raise InvalidArgument(f"{what}: unknown datatype {str(datatype)[:32]!r}; use one of {sorted(BY_OIP)}")
        shape = _shape(tensor.get("shape"), what)
        own = _object(tensor.get("parameters"), f"{what}: `parameters`")
        if "binary_data_size" in own:
            if "data" in tensor:
                raise InvalidArgument(f"{what} has both `data` and parameters.binary_data_size; send one")
            raw = _binary_input(binary, offset, own["binary_data_size"], shape, element, what)
            offset += len(raw)
        else:
            if "data" not in tensor:
                raise InvalidArgument(f"{what} has no `data` (nor parameters.binary_data_size)")
            raw = raw_from_values(flatten(tensor["data"], shape, what), datatype, element, what)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data after the JSON belong to no input "
            "(the inputs' binary_data_size add up to less)"
        )
    return InferCall(request, _outputs(document.get("outputs"), request), binary_default)


def _outputs(outputs: object, request) -> dict[str, bool]:
    """Adds the requested outputs to `request`; their binary_data choices by name."""
    if outputs is None:
        return {}
    if not isinstance(outputs, list):
        raise InvalidArgument("`outputs` must be a list of {name, parameters}")
    choices: dict[str, bool] = {}
    for i, tensor in enumerate(outputs):
        tensor = _object(tensor, f"output #{i}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"output #{i} has no name")
        what = f"output {name[:64]!r}"
        parameters = _object(tensor.get("parameters"), f"{what}: `parameters`")
        if "classification" in parameters:
            raise InvalidArgument(f"{what}: the classification extension is not supported")
        if any(key.startswith("shared_memory") for key in parameters):
            raise InvalidArgument(f"{what}: the shared memory extension is not supported")
        if (binary := _flag(parameters, "binary_data", what)) is not None:
            choices[name] = binary
        request.outputs.add(name=name)
    return choices


def check_forwardable(request, limits: JsonLimits) -> bytes:
    """The serialized request, if the predictor channel can carry it (max_send_message_bytes)."""
    data = request.SerializeToString()
    if len(data) > limits.max_request_bytes:
        raise PayloadTooLarge(
            f"the request's tensors take {len(data)} bytes, more than a call to a predictor carries "
            f"({limits.max_request_bytes}, MODELGRID_GATEWAY_MAX_SEND_MESSAGE_BYTES)"
        )
    return data


# -- responses -------------------------------------------------------------------------------------------------


def _parameters_json(parameters) -> dict:
    """An InferParameter map as JSON values."""
    return {key: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for key, p in parameters.items()}


def values_of(datatype: str, shape: list[int], raw: bytes, what: str, max_values: int) -> list:
    """The flat JSON values of a raw output tensor."""
    element = BY_OIP.get(datatype)
    count = element_count(shape, what)
    if count > max_values:
        raise PayloadTooLarge(
            f"{what} has {count} elements, more than a JSON answer carries ({max_values}, "
            "MODELGRID_GATEWAY_OIP_REST_MAX_JSON_VALUES); ask for it as binary data (parameters.binary_data: true)"
        )
    if element is not None and element.name == "string":
        try:
            return [item.decode() for item in decode_strings(raw, tuple(shape), None).reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"{what} holds bytes that are not UTF-8 text; ask for it as binary data (parameters.binary_data: true)"
            ) from None
    if element is not None and element.numpy is None:  # BF16: no numpy type to write JSON numbers from
        raise InvalidArgument(f"{what} is {datatype}, which JSON cannot carry; ask for it as binary data")
    if element is None or len(raw) != count * element.numpy.itemsize:
        raise ValueError(f"{what}: the predictor answered {len(raw)} bytes of {datatype} for shape {shape}")
    return np.frombuffer(raw, dtype=element.numpy).tolist()


def infer_response(response, call: InferCall, max_json_values: int) -> tuple[bytes, int | None]:
    """(body, JSON length when binary data follows it) of a predictor's ModelInferResponse."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError("the predictor's answer has no raw contents for some outputs")
    outputs, binary = [], []
    left = max_json_values  # the bound holds for all the outputs written as JSON together
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters_json(tensor.parameters)
        if call.binary(tensor.name):
            parameters["binary_data_size"] = len(raw)
            binary.append(raw)
        else:
            entry["data"] = values_of(tensor.datatype, list(tensor.shape), raw, f"output {tensor.name!r}", left)
            left -= len(entry["data"])
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = _parameters_json(response.parameters)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def server_metadata(response) -> dict:
    """The server metadata JSON of a ServerMetadataResponse, with the REST front's binary extension."""
    extensions = list(dict.fromkeys([*response.extensions, BINARY_EXTENSION]))
    return {"name": response.name, "version": response.version, "extensions": extensions}


def model_metadata(response) -> dict:
    """The model metadata JSON of a ModelMetadataResponse."""

    def tensors(items) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }
