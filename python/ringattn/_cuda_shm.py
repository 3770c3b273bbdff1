"""CUDA shared memory on the client's side (same-host calls with torch tensors on a GPU; the
service's rules are in docs/security.md): each allocation block a call's tensors live in is
exported by CUDA IPC (torch's storage handle), registered for the call
(RegisterCudaSharedMemory), and referred to; the outputs are fresh tensors on the same GPU that
the service's GPU workers write in place. Nothing crosses the host.
"""
import itertools
import os

_counter = itertools.count()


def eligible(ops, like):
    """Whether every input is a torch tensor on one CUDA device and results go back there."""
    if not like.torch or getattr(like.device, "type", None) != "cuda":
        return False
    devices = set()
    for op in ops.values():
        t = op.cuda_tensor()
        if t is None:
            return False
        devices.add(t.device)
        if _export(t)[0] is None:  # e.g. an expandable segment: no cudaIpcMemHandle_t
            return False
    return len(devices) == 1


_IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t


def ipc_handle(raw):
    """The cudaIpcMemHandle_t inside torch's storage handle, or None when it holds none.

    Older torch returns the 64 bytes themselves; newer torch prefixes a version byte and a kind
    byte: b"c" for a cudaMalloc block (the handle follows), b"e" for an expandable segment
    (memory-pool handles, which this path does not take)."""
    raw = bytes(raw)
    if len(raw) == _IPC_HANDLE_BYTES:
        return raw
    if len(raw) == _IPC_HANDLE_BYTES + 2 and raw[1:2] == b"c":
        return raw[2:]
    return None


def _export(t):
    """(handle bytes or None, byte offset of t in the handle's allocation block)."""
    storage = t.untyped_storage()
    shared = storage._share_cuda_()
    handle, storage_offset = shared[1], shared[3]
    return ipc_handle(handle), storage_offset + t.storage_offset() * t.element_size()


class Call:
    """One call's registrations: `ref(tensor)` exports and refers to a tensor; `register` sends
    the registrations, `close` takes them back."""

    def __init__(self, register, unregister):
        self._register = register
        self._unregister = unregister
        self._blocks = {}  # handle -> [name, end, device]
        self._registered = []

    def ref(self, t, nbytes):
        handle, at = _export(t)
        block = self._blocks.get(handle)
        if block is None:
            block = self._blocks[handle] = [
                f"py_cuda_{os.getpid()}_{next(_counter)}", 0, t.device.index or 0]
        block[1] = max(block[1], at + nbytes)
        return block[0], at

    def register(self, timeout):
        for handle, (name, end, device) in self._blocks.items():
            self._register(name, handle, device, end, timeout)
            self._registered.append(name)

    def close(self, timeout):
        for name in self._registered:
            try:
                self._unregister(name, timeout)
            except Exception:  # the call's outcome stands; the service drops them with the caller
                pass
        self._registered = []
