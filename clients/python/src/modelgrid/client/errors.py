"""Domain errors raised by service cores; one interceptor turns them into gRPC status codes."""


class ModelgridError(Exception):
    """Base of every error whose message is safe and useful to show to a client."""


class InvalidArgument(ModelgridError):
    """The request is malformed or violates a documented limit."""


class NotFound(ModelgridError):
    """The named thing does not exist."""


class AlreadyExists(ModelgridError):
    """The thing to create exists already."""


class FailedPrecondition(ModelgridError):
    """The system is not in the state the request requires (e.g. an alias compare-and-set lost)."""


class ResourceExhausted(ModelgridError):
    """A size, queue or rate limit was reached."""


class DeadlineExceeded(ModelgridError):
    """The work could not finish before the caller's deadline."""


class Unavailable(ModelgridError):
    """A dependency is unreachable; the call may succeed when retried."""


class Aborted(ModelgridError):
    """A concurrent change got in the way; the call may succeed when retried."""


class DataLoss(ModelgridError):
    """Stored bytes do not match their recorded digest."""


class Unauthenticated(ModelgridError):
    """No credentials, or credentials that are not valid."""


class PermissionDenied(ModelgridError):
    """Valid credentials that do not allow this call."""
