"""TensorFlow execution of one SavedModel version: load it, read its serving signature, check inputs against it,
and run it on numpy arrays. Nothing here touches gRPC or the event loop; the batcher calls `run` in a thread."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelgrid.client.errors import FailedPrecondition, InvalidArgument
from modelgrid.client.tensors import BY_NAME, BY_TF, element_type_of

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class IOSpec:
    """A signature tensor: name, element type name (e.g. "float32") and shape (-1: any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class ModelSignature:
    """A serving signature."""

    name: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def describe(self) -> str:
        """E.g. "inputs (x: float32[-1,4]) -> outputs (y: float32[-1,3])"."""
        return f"inputs ({', '.join(map(str, self.inputs))}) -> outputs ({', '.join(map(str, self.outputs))})"

    @property
    def batched(self) -> bool:
        """True when every input's first dimension is free: requests can be concatenated along it."""
        return all(spec.shape and spec.shape[0] == -1 for spec in self.inputs)

    def check_inputs(self, inputs: dict[str, np.ndarray], max_rows: int) -> int:
        """Checks names, dtypes and shapes; returns the number of rows. InvalidArgument names the signature."""
        expected = {spec.name: spec for spec in self.inputs}
        unknown, missing = sorted(set(inputs) - set(expected)), sorted(set(expected) - set(inputs))
        if unknown or missing:
            problems = ([f"unknown inputs {unknown}"] if unknown else []) + (
                [f"missing inputs {missing}"] if missing else []
            )
            raise InvalidArgument(f"{'; '.join(problems)}; the model expects {self.describe()}")
        rows = set()
        for name, array in inputs.items():
            spec = expected[name]
            dtype = element_type_of(array).name
            if dtype != spec.dtype:
                raise InvalidArgument(
                    f"input {name!r} has dtype {dtype}, expected {spec.dtype}; the model expects {self.describe()}"
                )
            if array.ndim != len(spec.shape) or any(
                want != -1 and got != want for got, want in zip(array.shape, spec.shape, strict=True)
            ):
                raise InvalidArgument(
                    f"input {name!r} has shape {list(array.shape)}, expected {list(spec.shape)} (-1: any); "
                    f"the model expects {self.describe()}"
                )
            rows.add(array.shape[0] if array.ndim else 1)
        if len(rows) > 1:
            raise InvalidArgument(f"inputs disagree on the batch dimension: {sorted(rows)}")
        count = rows.pop() if rows else 1
        if count > max_rows:
            raise InvalidArgument(
                f"request has {count} rows, more than the limit of {max_rows} (MODELGRID_PREDICTOR_MAX_REQUEST_ROWS)"
            )
        return count

    def synthetic_inputs(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Zero-filled inputs matching the signature, free dimensions set to `rows` (first) or 1 (others)."""
        arrays = {}
        for spec in self.inputs:
            shape = tuple(rows if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(spec.shape))
            element = BY_NAME[spec.dtype]
            if element.numpy is None:
                arrays[spec.name] = np.full(shape, b"", dtype=object)
            else:
                arrays[spec.name] = np.zeros(shape, dtype=element.numpy)
        return arrays


def configure_tensorflow(threads: int) -> None:
    """Sets TensorFlow's thread pools; must run before the first model loads."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _io_spec(name: str, spec) -> IOSpec:
    element = BY_TF.get(spec.dtype.as_datatype_enum)
    if element is None:
        raise FailedPrecondition(f"signature tensor {name!r} has unsupported dtype {spec.dtype.name}")
    shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return IOSpec(name, element.name, shape)


class SavedModelRunner:
    """A loaded SavedModel signature, callable on a dict of numpy arrays (blocking; run it off the event loop)."""

    def __init__(self, path: Path, signature_name: str = DEFAULT_SIGNATURE) -> None:
        import tensorflow as tf

        self._tf = tf
        self._model = tf.saved_model.load(str(path))
        signatures = self._model.signatures
        if signature_name not in signatures:
            raise FailedPrecondition(
                f"SavedModel has no signature {signature_name!r}; it has {sorted(signatures.keys())}"
            )
        self._fn = signatures[signature_name]
        _, kwargs = self._fn.structured_input_signature
        outputs = self._fn.structured_outputs
        if not isinstance(outputs, dict):
            raise FailedPrecondition("the serving signature must return a dict of named outputs")
        self.signature = ModelSignature(
            signature_name,
            tuple(_io_spec(name, spec) for name, spec in sorted(kwargs.items())),
            tuple(_io_spec(name, spec) for name, spec in sorted(outputs.items())),
        )

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: self._tf.convert_to_tensor(array) for name, array in inputs.items()}
        return {name: value.numpy() for name, value in self._fn(**tensors).items()}
