"""Bounds of a job spec, checked at submit without TensorFlow: numbers within the trainer's limits (settings), and
recipe parameters against what the recipe declares.

A built-in recipe's parameters are declared here (name, type, range), next to the recipes' signatures in
services/trainer/worker/recipes.py; a test keeps the two in step. A file recipe's parameters are the keyword
parameters of its `build_model`, read from its source with `ast` (the trainer never imports a user's module): a
parameter it does not take is refused at submit unless it takes `**params`. The same goes for a registry recipe
(`registry:<name>/<version>`), whose source the trainer fetched; a recipe's `TASK`, if it sets one, must be one of
the tasks of the recipe contract (services/trainer/worker/contract.py).
"""

import ast
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import shown
from services.trainer.worker.contract import TASKS

MAX_LAYERS = 64
"""Most entries of a list of layer sizes (hidden_units, filters)."""
ACTIVATIONS = (
    "relu", "gelu", "tanh", "sigmoid", "elu", "selu", "swish", "silu", "mish", "softplus", "softsign",
    "leaky_relu", "hard_sigmoid", "exponential", "linear",
)  # fmt: skip
_SETTING = "MODELGRID_TRAINER_"


@dataclass(frozen=True)
class Param:
    """One declared parameter: "units" (a positive int up to the layer limit), "units_list", "fraction" (0 <= x <
    1), "kernel" (1-15), "shape" (2 or 3 positive ints), or "activation"."""

    kind: str


BUILTIN_RECIPE_PARAMS: dict[str, dict[str, Param]] = {
    "mlp": {"hidden_units": Param("units_list"), "dropout": Param("fraction"), "activation": Param("activation")},
    "cnn": {
        "filters": Param("units_list"),
        "kernel_size": Param("kernel"),
        "dense_units": Param("units"),
        "dropout": Param("fraction"),
        "image_shape": Param("shape"),
    },
}


def _fail(message: str) -> NoReturn:
    raise InvalidArgument(f"invalid job spec: {message}")


def check_number(name: str, value: float, low: float, high: float, setting: str = "") -> None:
    """low <= value <= high and finite, else InvalidArgument naming the bound (and the setting that sets it)."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(f"{name} must be a finite number")
    if not low <= value <= high:
        where = f" (setting {setting})" if setting else ""
        _fail(f"{name} must be between {low} and {high}{where}, got {value}")


def check_recipe_params(recipe: str, params: dict[str, Any], source: str, max_units: int, max_bytes: int) -> None:
    """`params` fit the recipe: a built-in's declared names and ranges, or the names a file recipe's build_model
    takes; their JSON at most `max_bytes`."""
    try:
        size = len(json.dumps(params, allow_nan=False, default=str).encode()) if params else 0
    except ValueError:
        _fail("recipe_params must hold finite numbers only")
    if size > max_bytes:
        _fail(f"recipe_params take {size} bytes as JSON, over {max_bytes} (setting {_SETTING}MAX_RECIPE_PARAMS_BYTES)")
    if recipe in BUILTIN_RECIPE_PARAMS:
        declared = BUILTIN_RECIPE_PARAMS[recipe]
        for name, value in params.items():
            if name not in declared:
                _fail(f"recipe {recipe} takes no parameter {shown(name)}; it takes {sorted(declared)}")
            _check_value(f"recipe_params.{name}", declared[name], value, max_units)
        return
    accepted, any_keyword = _build_model_params(source)
    unknown = sorted(name for name in params if name not in accepted)
    if unknown and not any_keyword:
        _fail(
            f"the recipe's build_model takes no parameter(s) [{', '.join(shown(n) for n in unknown[:10])}]; "
            f"it takes {sorted(accepted)}"
        )


def _check_value(name: str, param: Param, value: Any, max_units: int) -> None:
    def positive_int(x: Any, high: int) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer() and 1 <= x <= high

    if param.kind == "units":
        ok = positive_int(value, max_units)
    elif param.kind == "units_list":
        ok = isinstance(value, list) and len(value) <= MAX_LAYERS and all(positive_int(v, max_units) for v in value)
    elif param.kind == "fraction":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1
    elif param.kind == "kernel":
        ok = positive_int(value, 15)
    elif param.kind == "shape":
        ok = isinstance(value, list) and len(value) in (2, 3) and all(positive_int(v, 1 << 16) for v in value)
    else:
        ok = value in ACTIVATIONS
    if not ok:
        _fail(f"{name} must be {_DESCRIBE[param.kind].format(units=max_units, layers=MAX_LAYERS)}")


_DESCRIBE = {
    "units": "a whole number from 1 to {units} (setting " + _SETTING + "MAX_LAYER_UNITS)",
    "units_list": "a list of at most {layers} whole numbers from 1 to {units} (setting "
    + _SETTING
    + "MAX_LAYER_UNITS)",
    "fraction": "a number from 0 up to (not including) 1",
    "kernel": "a whole number from 1 to 15",
    "shape": "a list of 2 or 3 whole numbers from 1 to 65536",
    "activation": f"one of {list(ACTIVATIONS)}",
}


def _build_model_params(source: str) -> tuple[set[str], bool]:
    """The keyword parameters of a file recipe's top-level build_model (after input_shape and num_classes), and
    whether it takes **kwargs; InvalidArgument when the source has no such function or sets TASK to a literal
    that is not a task."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte
        _fail(f"the recipe is not valid Python (line {getattr(exc, 'lineno', '?')}): {getattr(exc, 'msg', exc)}")
    except (RecursionError, MemoryError):  # expressions nested thousands deep
        _fail("the recipe is nested too deeply for the Python parser")
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TASK" for t in node.targets):
            if isinstance(node.value, ast.Constant) and node.value.value not in TASKS:
                _fail(f"the recipe sets TASK to {shown(str(node.value.value), 40)}; it must be one of {list(TASKS)}")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "build_model":
            args = node.args
            positional = [a.arg for a in [*args.posonlyargs, *args.args]]
            return {*positional[2:], *(a.arg for a in args.kwonlyargs)}, args.kwarg is not None
    _fail("the recipe defines no top-level build_model(input_shape, num_classes, **params)")
