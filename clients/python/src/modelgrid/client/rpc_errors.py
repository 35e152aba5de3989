"""Failed calls to another service as the kit's domain errors, so that cores never branch on gRPC status codes.

Clients wrap their calls in `rpc_errors(...)`; the server interceptor maps the domain errors back to the same status
codes, so a NOT_FOUND from the registry reaches the predictor's caller as NOT_FOUND with the registry's message.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from modelgrid.client import errors

_ERROR_OF: dict[grpc.StatusCode, type[errors.ModelgridError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


def domain_error(err: grpc.RpcError, service: str) -> errors.ModelgridError:
    """The domain error for a failed call to `service`. Codes that say something about the request keep the
    callee's message; any other failure (UNAVAILABLE, INTERNAL, UNKNOWN, CANCELLED...) is Unavailable: retryable
    from the caller's point of view, with a message that names the service but not its internals."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else ""
    error = _ERROR_OF.get(code)
    if error is not None:
        return error(details or f"{service}: {code.name}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"{service} is unavailable ({code.name}): down or restarting; retry when it is back")
    return errors.Unavailable(f"{service} failed ({code.name})")


@contextmanager
def rpc_errors(service: str) -> Iterator[None]:
    """Re-raises a grpc.RpcError from the calls inside as the domain error for its status."""
    try:
        yield
    except grpc.RpcError as err:
        raise domain_error(err, service) from err
