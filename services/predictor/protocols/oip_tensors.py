"""Open Inference Protocol tensors <-> numpy: raw contents, typed contents, and the checks that tell a client what
is wrong with its request.

Every function takes plain values or duck-typed objects (anything with the message's attribute names, e.g. an
`inference.ModelInferRequest.InferInputTensor` or a `types.SimpleNamespace`) and builds no protobuf message, so
it can be tested without the `inference` proto package.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.tensors import (
    BY_OIP,
    CONTENTS_FIELD,
    STRING_ELEMENT_BYTES,
    ElementType,
    SizeBudget,
    array_from_raw,
    element_bytes,
    element_count,
    element_type_of,
    input_label,
    raw_of,
)

CONTENTS_FIELDS = tuple(dict.fromkeys(CONTENTS_FIELD.values()))


def element_of(datatype: str, what: str) -> ElementType:
    """The element type of an OIP datatype string; InvalidArgument listing the valid ones."""
    element = BY_OIP.get(datatype)
    if element is None:
        raise InvalidArgument(f"{what}: unknown datatype {datatype!r}; use one of {sorted(BY_OIP)}")
    return element


def _field(contents: object, name: str) -> Sequence:
    if contents is None:
        return ()
    if isinstance(contents, Mapping):
        return contents.get(name, ())
    return getattr(contents, name, ())


def filled_fields(contents: object) -> list[str]:
    """Names of the typed-contents members that hold values."""
    return [name for name in CONTENTS_FIELDS if len(_field(contents, name))]


def array_from_contents(
    datatype: str, shape: Sequence[int], contents: object, what: str, budget: SizeBudget | None = None
) -> np.ndarray:
    """A numpy array from typed contents (`contents.<type>_contents`, flattened row-major). The shape is checked,
    then the number of values against it, then the decoded size against `budget`, before anything is allocated."""
    element = element_of(datatype, what)
    count = element_count(shape, what)
    shape = tuple(shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"{what}: {datatype} has no typed contents field; send it in raw_input_contents")
    wrong = [name for name in filled_fields(contents) if name != field]
    if wrong:
        raise InvalidArgument(f"{what}: a {datatype} tensor carries its elements in {field}, but {wrong} hold values")
    values = _field(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{what}: {len(values)} values in {field} do not match shape {list(shape)} ({count} elements)"
        )
    if budget is not None:
        budget.charge_tensor(count, element, what)
    if element.name == "string":
        strings = np.empty(count, dtype=object)
        strings[:] = [bytes(v) for v in values]
        return strings.reshape(shape)
    if element.numpy.kind in "iu":
        wide = np.array(values, dtype=np.uint64 if element.numpy.kind == "u" else np.int64)
        limits = np.iinfo(element.numpy)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidArgument(f"{what}: values outside the {datatype} range [{limits.min}, {limits.max}]")
        return wide.astype(element.numpy).reshape(shape)
    return np.array(values, dtype=element.numpy).reshape(shape)


def array_from_raw_contents(
    datatype: str, shape: Sequence[int], raw: bytes, what: str, budget: SizeBudget | None = None
) -> np.ndarray:
    """A numpy array from one entry of raw_input_contents (BYTES: 4-byte LE length + bytes per element), checked
    against its shape and `budget` before anything is allocated."""
    return array_from_raw(raw, element_of(datatype, what), tuple(shape), what, budget)


def arrays_from_inputs(
    inputs: Sequence, raw_input_contents: Sequence[bytes], budget: SizeBudget | None = None
) -> dict[str, np.ndarray]:
    """The request's inputs by name. With raw_input_contents (one entry per input, in order) every input is raw;
    without, every input reads its typed `contents`. Mixing both is an error. All inputs together are charged to
    `budget` (one per request)."""
    if raw_input_contents and len(raw_input_contents) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_input_contents)} entries for {len(inputs)} inputs; "
            "send one entry per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        what = input_label(tensor.name)
        if not tensor.name:
            raise InvalidArgument(f"input #{i} has no name")
        if tensor.name in arrays:
            raise InvalidArgument(f"{what} appears more than once")
        if raw_input_contents:
            if filled_fields(tensor.contents):
                raise InvalidArgument(
                    f"{what} has typed contents while the request uses raw_input_contents; use one or the other "
                    "for all inputs"
                )
            arrays[tensor.name] = array_from_raw_contents(
                tensor.datatype, tensor.shape, raw_input_contents[i], what, budget
            )
        else:
            arrays[tensor.name] = array_from_contents(tensor.datatype, tensor.shape, tensor.contents, what, budget)
    return arrays


def decode_work(inputs: Sequence, raw_input_contents: Sequence[bytes]) -> int:
    """About how many bytes decoding the inputs builds element by element (raw numbers are a view of the
    message: none). Cheap: lengths only, so a request can be sent to a thread before it is checked."""
    work = 0
    for i, tensor in enumerate(inputs):
        element = BY_OIP.get(tensor.datatype)
        if element is None:
            continue
        if raw_input_contents:
            if element.name == "string" and i < len(raw_input_contents):
                work += len(raw_input_contents[i]) // 4 * STRING_ELEMENT_BYTES  # at most one element per 4 bytes
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is not None:
                work += len(_field(tensor.contents, field)) * element_bytes(element)
    return work


def raw_output(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw bytes) of an output, for InferOutputTensor plus raw_output_contents."""
    return element_type_of(array).oip, list(array.shape), raw_of(array)
