"""ringattn: exact attention over long sequences, computed by a ringattn service.

    import ringattn
    client = ringattn.Client("127.0.0.1:50051")
    out = client.attend(q, k, v, causal=True).out      # numpy arrays or torch tensors

    import ringattn.torch
    out = ringattn.torch.attention(q, k, v, causal=True)   # differentiable (AttendBackward)

docs/python.md has the whole story.
"""
from .client import (NO_RETRY, AttendResult, BackwardResult, CallInfo, Client, RetryPolicy, connect,
                     default_client, is_loopback_target, set_default_client)
from .errors import (AbortedError, AlreadyExistsError, CancelledError, DataLossError,
                     DeadlineExceededError, FailedPreconditionError, InternalError,
                     InvalidArgumentError, NotFoundError, OutOfRangeError, PermissionDeniedError,
                     ResourceExhaustedError, RingAttnError, UnauthenticatedError,
                     UnavailableError, UnimplementedError, UnknownError)

__version__ = "0.1.0"

__all__ = [
    "Client", "connect", "default_client", "set_default_client", "RetryPolicy", "NO_RETRY",
    "AttendResult", "BackwardResult", "CallInfo", "is_loopback_target", "RingAttnError",
    "CancelledError", "UnknownError", "InvalidArgumentError", "DeadlineExceededError",
    "NotFoundError", "AlreadyExistsError", "PermissionDeniedError", "ResourceExhaustedError",
    "FailedPreconditionError", "AbortedError", "OutOfRangeError", "UnimplementedError",
    "InternalError", "UnavailableError", "DataLossError", "UnauthenticatedError",
]


def __getattr__(name):
    # ringattn.torch and ringattn.ring_flash_attn import torch: loaded on first use only.
    if name in ("torch", "ring_flash_attn"):
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
