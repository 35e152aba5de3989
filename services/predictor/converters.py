"""Conversions between predictor protobuf messages and domain types."""

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc
import numpy as np

from modelgrid.client import convert
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.modelref import ModelRef, check_model_name
from modelgrid.client.tensors import (
    BY_NAME,
    STRING_ELEMENT_BYTES,
    SizeBudget,
    array_to_tensor,
    input_label,
    tensor_to_array,
)
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.kit.settings import MiB
from services.predictor.domain import ModelStatus, VersionPolicy
from services.predictor.runtime import IOSpec
from services.predictor.settings import DEFAULT_MAX_REQUEST_BYTES, MAX_REQUEST_BYTES_SETTING

T = TypeVar("T")

OFF_LOOP_BYTES = MiB
"""Conversions that build more than this element by element (string tensors, typed values) run in a thread, so
the event loop keeps answering other calls and health checks; smaller ones run inline (a thread hop costs more
than they do)."""


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the time.monotonic() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def ref_from_pb(ref: common_pb2.ModelRef) -> ModelRef:
    """A caller's model reference, checked."""
    check_model_name(ref.name)
    if ref.WhichOneof("selector") == "version" and ref.version < 1:
        raise InvalidArgument("version must be >= 1")
    return convert.ref_from_pb(ref)


def request_budget(max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> SizeBudget:
    """The size budget of one request's input tensors (MODELGRID_PREDICTOR_MAX_REQUEST_BYTES)."""
    return SizeBudget(max_request_bytes, MAX_REQUEST_BYTES_SETTING)


def inputs_from_pb(inputs, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> dict[str, np.ndarray]:
    """A request's input tensors, each checked against its shape and all of them against `max_request_bytes`
    before it is allocated."""
    budget = request_budget(max_request_bytes)
    return {name: tensor_to_array(tensor, input_label(name), budget) for name, tensor in inputs.items()}


def string_work(arrays: Iterable[np.ndarray]) -> int:
    """About how many bytes encoding `arrays` builds element by element (their string elements; numbers are
    copied whole)."""
    return sum(array.size for array in arrays if array.dtype.kind == "O") * STRING_ELEMENT_BYTES


async def run_conversion(work: int, function: Callable[[], T]) -> T:
    """`function()` inline when `work` (bytes built element by element) is below OFF_LOOP_BYTES, else in a
    thread so a large string tensor does not stall the event loop."""
    if work < OFF_LOOP_BYTES:
        return function()
    return await asyncio.to_thread(function)


def outputs_to_pb(outputs: dict[str, np.ndarray]) -> dict[str, common_pb2.Tensor]:
    return {name: array_to_tensor(array) for name, array in outputs.items()}


def policy_from_pb(policy: pb.VersionPolicy) -> VersionPolicy:
    which = policy.WhichOneof("policy")
    if which == "latest":
        if policy.latest < 1:
            raise InvalidArgument("latest must be >= 1")
        return VersionPolicy(latest=policy.latest, all_aliases=policy.all_aliases)
    if which == "specific":
        return VersionPolicy(versions=tuple(policy.specific.versions), all_aliases=policy.all_aliases)
    if which == "aliases":
        return VersionPolicy(aliases=tuple(policy.aliases.aliases), all_aliases=policy.all_aliases)
    return VersionPolicy(all_aliases=policy.all_aliases)


def policy_to_pb(policy: VersionPolicy) -> pb.VersionPolicy:
    if policy.versions:
        message = pb.VersionPolicy(specific=pb.Versions(versions=policy.versions))
    elif policy.aliases:
        message = pb.VersionPolicy(aliases=pb.Aliases(aliases=policy.aliases))
    else:
        message = pb.VersionPolicy(latest=policy.effective_latest)
    message.all_aliases = policy.all_aliases
    return message


def spec_to_pb(spec: IOSpec) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=spec.name, dtype=BY_NAME[spec.dtype].proto, shape=spec.shape)


def status_to_pb(model: ModelStatus) -> pb.ModelStatus:
    versions = []
    for version in model.versions:
        status = pb.VersionStatus(
            version=version.version,
            state=pb.VersionState.Value(f"VERSION_STATE_{version.state.value}"),
            reason=version.reason,
            aliases=version.aliases,
        )
        if version.available:
            status.available_since.CopyFrom(convert.timestamp(version.available_since))
        versions.append(status)
    message = pb.ModelStatus(name=model.name, policy=policy_to_pb(model.policy), versions=versions, reason=model.reason)
    signature = model.signature
    if signature is not None:
        message.inputs.extend(spec_to_pb(s) for s in signature.inputs)
        message.outputs.extend(spec_to_pb(s) for s in signature.outputs)
    return message
