"""The service's errors as Python exceptions.

Every failed call raises a RingAttnError (or the subclass of its code) carrying the gRPC status
code (`code`, a grpc.StatusCode), the server's message as it came (`message`), and the RPC
(`rpc`). Bad arguments found before any call are ValueError or TypeError.
"""
import grpc


class RingAttnError(Exception):
    """A call that ended with a non-OK status."""

    def __init__(self, code, message, rpc=""):
        self.code = code
        self.message = message
        self.rpc = rpc
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        super().__init__(f"{rpc + ': ' if rpc else ''}{name}: {message}")


class CancelledError(RingAttnError): pass  # noqa: E701
class UnknownError(RingAttnError): pass  # noqa: E701
class InvalidArgumentError(RingAttnError): pass  # noqa: E701
class DeadlineExceededError(RingAttnError): pass  # noqa: E701
class NotFoundError(RingAttnError): pass  # noqa: E701
class AlreadyExistsError(RingAttnError): pass  # noqa: E701
class PermissionDeniedError(RingAttnError): pass  # noqa: E701
class ResourceExhaustedError(RingAttnError): pass  # noqa: E701
class FailedPreconditionError(RingAttnError): pass  # noqa: E701
class AbortedError(RingAttnError): pass  # noqa: E701
class OutOfRangeError(RingAttnError): pass  # noqa: E701
class UnimplementedError(RingAttnError): pass  # noqa: E701
class InternalError(RingAttnError): pass  # noqa: E701
class UnavailableError(RingAttnError): pass  # noqa: E701
class DataLossError(RingAttnError): pass  # noqa: E701
class UnauthenticatedError(RingAttnError): pass  # noqa: E701


_BY_CODE = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error(code, message, rpc=""):
    """The exception of `code` (a grpc.StatusCode)."""
    return _BY_CODE.get(code, RingAttnError)(code, message, rpc)


def from_rpc_error(e, rpc=""):
    """The exception for a grpc.RpcError raised by a call of `rpc`."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return error(code, details or "", rpc)
