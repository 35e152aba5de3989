"""Conversions between predictor protobuf messages and domain types."""

import time

import grpc
import numpy as np

from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2 as pb
from services.kit import convert
from services.kit.errors import InvalidArgument
from services.kit.modelref import ModelRef, check_model_name
from services.kit.tensors import BY_NAME, array_to_tensor, tensor_to_array
from services.predictor.domain import ModelStatus, VersionPolicy
from services.predictor.runtime import IOSpec


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


def inputs_from_pb(inputs) -> dict[str, np.ndarray]:
    return {name: tensor_to_array(tensor, f"input {name!r}") for name, tensor in inputs.items()}


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
