"""System shared memory on the client's side (same-host calls; the service's rules are in
docs/security.md): a POSIX shared-memory object this process creates, registered with the
service under a name, and the placement of one call's tensors in it.

A region holds one call at a time: its inputs at 64-byte-aligned slots in the RPC's order, then
its outputs (the service writes them there). Regions are pooled per Client, one per concurrent
call, grown by replacing them.
"""
import itertools
import mmap
import os
import threading

import numpy as np

try:
    import _posixshmem
except ImportError:  # not a POSIX CPython: no system shared memory
    _posixshmem = None

ALIGNMENT = 64
_counter = itertools.count()


def available():
    return _posixshmem is not None


def _align(n):
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Region:
    """A shm object of `size` bytes created (mode 0600) and mapped here; unlinked on close."""

    def __init__(self, size):
        self.name = f"ringattn_py_{os.getpid()}_{next(_counter)}"
        self.key = "/" + self.name
        self.size = size
        fd = _posixshmem.shm_open(self.key, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink(self.key)
            raise
        os.close(fd)
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)

    def view(self, offset, nbytes):
        return self.bytes[offset:offset + nbytes]

    def close(self):
        self.bytes = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        try:
            _posixshmem.shm_unlink(self.key)
        except FileNotFoundError:
            pass


class Placement:
    """Slots of one call: {name: (offset, nbytes)} for inputs then outputs, in order."""

    def __init__(self, inputs, outputs):
        self.slots = {}
        at = 0
        for name, nbytes in list(inputs) + list(outputs):
            self.slots[name] = (at, nbytes)
            at = _align(at + nbytes)
        self.bytes = max(at, ALIGNMENT)


class Pool:
    """Registered regions of one client, one per call in flight.

    `register(name, key, size)` and `unregister(name)` are the client's RPCs; acquire returns a
    region of at least `nbytes` (registering a new one when no free one is large enough), None
    when `limit` regions are in use."""

    def __init__(self, register, unregister, limit=8):
        self._register = register
        self._unregister = unregister
        self._limit = limit
        self._lock = threading.Lock()
        self._free = []
        self._count = 0

    def acquire(self, nbytes, timeout):
        with self._lock:
            fit = [r for r in self._free if r.size >= nbytes]
            if fit:
                region = min(fit, key=lambda r: r.size)
                self._free.remove(region)
                return region
            small = self._free.pop() if self._free else None
            if small is None and self._count >= self._limit:
                return None
            if small is None:
                self._count += 1
        if small is not None:
            self._drop(small, timeout)
        size = max(_align(nbytes), 1 << 20)
        try:
            region = Region(size)
        except BaseException:
            with self._lock:
                self._count -= 1
            raise
        try:
            self._register(region.name, region.key, region.size, timeout)
        except BaseException:
            region.close()
            with self._lock:
                self._count -= 1
            raise
        return region

    def release(self, region):
        with self._lock:
            self._free.append(region)

    def _drop(self, region, timeout):
        try:
            self._unregister(region.name, timeout)
        finally:
            region.close()

    def close(self, timeout=5.0):
        with self._lock:
            free, self._free = self._free, []
            self._count -= len(free)
        for region in free:
            try:
                self._drop(region, timeout)
            except Exception:  # the service may be gone; the object is unlinked anyway
                pass
