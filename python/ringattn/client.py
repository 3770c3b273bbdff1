"""ringattn.Client: Attend and AttendBackward from numpy arrays or torch tensors.

One call picks its data path itself: system shared memory when the service is on this host
(shared_memory="auto": a loopback target; the service refuses remote callers anyway), else one
unary message while the request fits the service's unary limit (GetInfo's max_unary_bytes)
and 32 MiB (gRPC moves one large message about three times slower than chunks), else the
chunked stream. The channel has no message limits of its own. A call raises
RingAttnError (errors.py) with the service's code and message; UNAVAILABLE (a ring re-forming,
a worker restarting, the service not yet up) is retried within the call's deadline.
"""
import atexit
import dataclasses
import random
import threading
import time
import uuid
import weakref
from typing import Any, Optional

import grpc
import numpy as np

from . import _cuda_shm, _proto, _shm, _tensors, _wire
from .errors import RingAttnError, error, from_rpc_error

_LAYOUTS = {"auto": "LAYOUT_AUTO", "contiguous": "LAYOUT_CONTIGUOUS", "zigzag": "LAYOUT_ZIGZAG",
            "stripe": "LAYOUT_STRIPE"}
_PROTOBUF_LIMIT = (1 << 31) - 1
_jitter = random.Random()  # its own: never draws from the caller's random state
_CHUNK_BYTES = 4 << 20
# Requests above this stream even within the unary limit (client/attention_client.h).
_STREAM_ABOVE_BYTES = 32 << 20
# Requests above this go in parts by K/V heads over the client's connections.
_SPLIT_ABOVE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed with one of `codes`, within the call's deadline: waits
    initial_backoff, then multiplier times longer each time up to max_backoff (each wait
    jittered by up to 20%), for at most max_attempts calls in all."""
    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 3.0
    multiplier: float = 2.0
    codes: tuple = (grpc.StatusCode.UNAVAILABLE,)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclasses.dataclass
class CallInfo:
    """What every compute call returns beside its tensors. timings: the service's
    ringattn.v1.Timings, with client_seconds (the RPC as this client saw it: messages built,
    sent, answered, parsed) and client_wire_seconds (that minus the service's total). plan: the
    ShardPlan. path: "cuda_shm", "shm", "unary" or "stream". input_copy_seconds / output_copy_seconds: the
    tensors' copies to and from the wire's bytes (or the shared-memory region) outside the RPC.
    attempts: calls made (retries + 1)."""
    timings: Any = None
    plan: Any = None
    request_id: str = ""
    path: str = ""
    input_copy_seconds: float = 0.0
    output_copy_seconds: float = 0.0
    attempts: int = 1


@dataclasses.dataclass
class AttendResult(CallInfo):
    """out: the attention, as q came (numpy/torch, dtype, device, format); lse: fp32
    [batch, heads, seq] when asked for, else None; the rest as CallInfo."""
    out: Any = None
    lse: Any = None


@dataclasses.dataclass
class BackwardResult(CallInfo):
    """dq, dk, dv as q, k, v came; the rest as CallInfo."""
    dq: Any = None
    dk: Any = None
    dv: Any = None


@dataclasses.dataclass(frozen=True)
class _Rpc:
    name: str
    inputs: tuple        # in stream order
    outputs: tuple
    request: Any
    stream_request: Any
    stream_response: Any
    response: Any


_ATTEND = _Rpc("Attend", ("q", "k", "v"), ("out", "lse"), _proto.AttendRequest,
               _proto.AttendStreamRequest, _proto.AttendStreamResponse, _proto.AttendResponse)
_BACKWARD = _Rpc("AttendBackward", ("q", "k", "v", "out", "dout", "lse"), ("dq", "dk", "dv"),
                 _proto.AttendBackwardRequest, _proto.AttendBackwardStreamRequest,
                 _proto.AttendBackwardStreamResponse, _proto.AttendBackwardResponse)


def _which(name):
    return _proto.enum_value("TensorChunk.Which", "WHICH_" + name.upper())


def is_loopback_target(target):
    """Whether `target` names this host: a Unix socket, localhost or a loopback address."""
    t = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
    if t.startswith("unix:") or t.startswith("unix-abstract:"):
        return True
    if t.startswith("["):
        host = t[1:t.find("]")] if "]" in t else t
    else:
        host = t.rsplit(":", 1)[0] if t.count(":") == 1 else t
    return host in ("localhost", "::1") or host.startswith("127.")


class Client:
    """A channel to a ringattn coordinator (host:port). Thread-safe.

    timeout: each call's default deadline in seconds (None: none). retry: RetryPolicy for
    UNAVAILABLE (NO_RETRY to fail at once). shared_memory: "auto" (use it when the target is on
    this host and the service accepts it), True (require it: a refusal raises), False (never).
    credentials: grpc.ChannelCredentials for a secure channel; metadata: (key, value) pairs sent
    with every call; options: extra channel arguments."""

    def __init__(self, target="127.0.0.1:50051", *, timeout=600.0, retry=RetryPolicy(),
                 shared_memory="auto", credentials=None, metadata=(), options=(), connections=4):
        if shared_memory not in ("auto", True, False):
            raise ValueError(f"shared_memory must be 'auto', True or False, got {shared_memory!r}")
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._metadata = tuple(metadata)
        args = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        args += list(options)
        def open_channel(i):
            own = args + [("ringattn.connection", i)]  # a connection of its own
            if credentials is None:
                return grpc.insecure_channel(target, options=own)
            return grpc.secure_channel(target, credentials, options=own)

        self._channel = open_channel(0)
        # Requests past _SPLIT_ABOVE_BYTES go in parts by K/V heads, one per connection.
        self._extra_channels = [open_channel(i) for i in range(1, max(1, int(connections)))]
        ch = self._channel
        unary = {}
        for rpc, req, resp in (("Attend", _proto.AttendRequest, _proto.AttendResponse),
                               ("AttendBackward", _proto.AttendBackwardRequest,
                                _proto.AttendBackwardResponse),
                               ("GetInfo", _proto.InfoRequest, _proto.InfoResponse),
                               ("RegisterSystemSharedMemory",
                                _proto.RegisterSystemSharedMemoryRequest,
                                _proto.RegisterSystemSharedMemoryResponse),
                               ("UnregisterSystemSharedMemory",
                                _proto.UnregisterSystemSharedMemoryRequest,
                                _proto.UnregisterSystemSharedMemoryResponse),
                               ("SystemSharedMemoryStatus", _proto.SystemSharedMemoryStatusRequest,
                                _proto.SystemSharedMemoryStatusResponse),
                               ("RegisterCudaSharedMemory", _proto.RegisterCudaSharedMemoryRequest,
                                _proto.RegisterCudaSharedMemoryResponse),
                               ("UnregisterCudaSharedMemory",
                                _proto.UnregisterCudaSharedMemoryRequest,
                                _proto.UnregisterCudaSharedMemoryResponse)):
            unary[rpc] = ch.unary_unary(_proto.method_path(rpc),
                                        request_serializer=req.SerializeToString,
                                        response_deserializer=resp.FromString)
        self._unary = unary
        # The tensors' calls carry bytes this module encodes and decodes itself (_wire.py).
        self._raw_unary = {r.name: ch.unary_unary(_proto.method_path(r.name))
                           for r in (_ATTEND, _BACKWARD)}
        self._streams = {r.name: ch.stream_stream(_proto.method_path(r.name + "Stream"))
                         for r in (_ATTEND, _BACKWARD)}
        self._part_streams = [self._streams] + [
            {r.name: c.stream_stream(_proto.method_path(r.name + "Stream"))
             for r in (_ATTEND, _BACKWARD)} for c in self._extra_channels]
        self._info = None
        self._info_lock = threading.Lock()
        want_shm = shared_memory is True or (shared_memory == "auto" and is_loopback_target(target))
        self._shm_mode = shared_memory
        self._shm_off_reason = None if want_shm else "off"
        if want_shm and not _shm.available():
            if shared_memory is True:
                raise RuntimeError("ringattn: system shared memory needs POSIX shared memory")
            self._shm_off_reason = "no POSIX shared memory here"
        self._shm_pool = _shm.Pool(self.register_system_shared_memory,
                                   self.unregister_system_shared_memory)
        # CUDA shared memory (CUDA IPC) for torch tensors on a GPU of this host, tried before
        # the system regions; off for good once the service refuses it (CPU workers).
        self._cuda_shm_off_reason = self._shm_off_reason
        _live_clients.add(self)

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self):
        """Unregisters and unlinks the shared-memory regions, closes the channel. Clients still
        open when the interpreter exits are closed then (the service's registrations count
        against a limit per caller, and every local process is one caller)."""
        _live_clients.discard(self)
        self._shm_pool.close()
        self._channel.close()
        for c in self._extra_channels:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- plain RPCs -------------------------------------------------------------------------
    def _deadline(self, timeout):
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline):
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _call_with_retry(self, rpc, deadline, attempt_fn):
        """attempt_fn(timeout) until it returns, a non-retried error, max_attempts or the
        deadline; returns (result, attempts)."""
        policy = self.retry
        backoff = policy.initial_backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return attempt_fn(self._remaining(deadline)), attempt
            except grpc.RpcError as e:
                err = from_rpc_error(e, rpc)
            if err.code not in policy.codes or attempt >= policy.max_attempts:
                raise err
            wait = backoff * (0.8 + 0.4 * _jitter.random())
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise err
            time.sleep(wait)
            backoff = min(backoff * policy.multiplier, policy.max_backoff)

    def _plain(self, rpc, request, timeout):
        call = self._unary[rpc]
        return self._call_with_retry(
            rpc, self._deadline(timeout),
            lambda remaining: call(request, timeout=remaining, metadata=self._metadata))[0]

    def info(self, timeout=None):
        """GetInfo: ring size, workers, backends and the service's limits (fresh each time)."""
        info = self._plain("GetInfo", _proto.InfoRequest(), timeout)
        with self._info_lock:
            self._info = info
        return info

    def _limits(self, timeout):
        with self._info_lock:
            info = self._info
        return info if info is not None else self.info(timeout)

    def register_system_shared_memory(self, name, key, byte_size, timeout=None, offset=0):
        self._plain("RegisterSystemSharedMemory", _proto.RegisterSystemSharedMemoryRequest(
            name=name, key=key, offset=offset, byte_size=byte_size), timeout)

    def unregister_system_shared_memory(self, name="", timeout=None):
        """Unregisters this caller's region `name` (empty: all of this caller's regions)."""
        self._plain("UnregisterSystemSharedMemory",
                    _proto.UnregisterSystemSharedMemoryRequest(name=name), timeout)

    def system_shared_memory_status(self, name="", timeout=None):
        return list(self._plain("SystemSharedMemoryStatus",
                                _proto.SystemSharedMemoryStatusRequest(name=name),
                                timeout).regions)

    @property
    def shared_memory_active(self):
        """Whether calls may go through system shared memory; when not,
        shared_memory_off_reason says why."""
        return self._shm_off_reason is None

    @property
    def shared_memory_off_reason(self):
        return self._shm_off_reason

    # ---- compute RPCs -----------------------------------------------------------------------
    def attend(self, q, k, v, *, causal=False, window=(-1, -1), alibi_slopes=None, softcap=0.0,
               softmax_scale=None, dropout_p=0.0, dropout_seed=0, cu_seqlens=None,
               layout="auto", return_lse=False, qkv_format="bshd", dtype=None, timeout=None,
               path=None, request_id=None):
        """Attention of q [batch, seq, heads, head_dim] over k, v [batch, seq, heads_k, head_dim]
        (qkv_format="bhsd": [batch, heads, seq, head_dim]) on the service.

        causal, window=(left, right) (-1: unbounded), alibi_slopes (one per query head), softcap
        (0: off), softmax_scale (None: 1/sqrt(head_dim)), dropout_p/dropout_seed (CPU workers),
        cu_seqlens (packed sequences, FlashAttention's), layout ("auto", "contiguous", "zigzag",
        "stripe": how the ring splits the sequence), return_lse. dtype: the wire's dtype ("fp32",
        "fp16", "bf16"; None: q's); results come back in q's dtype. path: None picks (CUDA
        shared memory for torch tensors on a GPU, then system shared memory, else unary while
        the request fits, else stream); "cuda_shm", "shm", "unary" or "stream" force one
        ("shm" and "cuda_shm" raise when the client cannot use them). Returns an
        AttendResult."""
        fmt = _check_format(qkv_format)
        wire = dtype or _tensors.natural_wire(q, "q")
        _check_wire(wire)
        if dtype is None:
            for name, x in (("k", k), ("v", v)):
                if _tensors.natural_wire(x, name) != wire:
                    raise TypeError(f"{name}.dtype {x.dtype} differs from q.dtype {q.dtype}; "
                                    "pass dtype= to convert")
        ops = {"q": _tensors.Operand(q, "q", wire, fmt), "k": _tensors.Operand(k, "k", wire, fmt),
               "v": _tensors.Operand(v, "v", wire, fmt)}
        header = _proto.AttendRequest(
            request_id=request_id or "", layout=_layout(layout), return_lse=bool(return_lse),
            options=_options(causal, window, alibi_slopes, softcap, softmax_scale, dropout_p,
                             dropout_seed, cu_seqlens))
        b, s, h, _ = ops["q"].shape
        outputs = [("out", wire, ops["q"].shape)]
        if return_lse:
            outputs.append(("lse", "fp32", (b, h, s)))
        r = self._compute(_ATTEND, header, ops, outputs, _tensors.Like(q, fmt), timeout, path)
        return AttendResult(out=r.tensors["out"], lse=r.tensors.get("lse"), **r.info())

    def attend_backward(self, q, k, v, out, lse, dout, *, causal=False, window=(-1, -1),
                        alibi_slopes=None, softcap=0.0, softmax_scale=None, dropout_p=0.0,
                        dropout_seed=0, cu_seqlens=None, layout="auto", qkv_format="bshd",
                        dtype=None, timeout=None, path=None, request_id=None):
        """Gradients dq, dk, dv of the attention the forward computed: its inputs, its out and
        lse (attend(..., return_lse=True)), dout the gradient of the loss with respect to out,
        with the forward's options. Arguments and formats as attend; lse is fp32
        [batch, heads, seq] whatever the format. Returns a BackwardResult."""
        fmt = _check_format(qkv_format)
        wire = dtype or _tensors.natural_wire(q, "q")
        _check_wire(wire)
        if dtype is None:
            for name, x in (("k", k), ("v", v), ("out", out), ("dout", dout)):
                if _tensors.natural_wire(x, name) != wire:
                    raise TypeError(f"{name}.dtype {x.dtype} differs from q.dtype {q.dtype}; "
                                    "pass dtype= to convert")
        ops = {name: _tensors.Operand(x, name, wire, fmt)
               for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout))}
        ops["lse"] = _tensors.Operand(lse, "lse", "fp32", lse=True)
        header = _proto.AttendBackwardRequest(
            request_id=request_id or "", layout=_layout(layout),
            options=_options(causal, window, alibi_slopes, softcap, softmax_scale, dropout_p,
                             dropout_seed, cu_seqlens))
        outputs = [("dq", wire, ops["q"].shape), ("dk", wire, ops["k"].shape),
                   ("dv", wire, ops["v"].shape)]
        like = _tensors.Like(q, fmt)
        r = self._compute(_BACKWARD, header, ops, outputs, like, timeout, path)
        return BackwardResult(dq=r.tensors["dq"], dk=r.tensors["dk"], dv=r.tensors["dv"],
                              **r.info())

    # ---- the three data paths ---------------------------------------------------------------
    def register_cuda_shared_memory(self, name, raw_handle, device_id, byte_size, timeout=None):
        """RegisterCudaSharedMemory: the first byte_size bytes of the GPU allocation whose
        cudaIpcMemHandle_t is raw_handle, under name."""
        self._plain("RegisterCudaSharedMemory", _proto.RegisterCudaSharedMemoryRequest(
            name=name, raw_handle=raw_handle, device_id=device_id, byte_size=byte_size), timeout)

    def unregister_cuda_shared_memory(self, name="", timeout=None):
        self._plain("UnregisterCudaSharedMemory",
                    _proto.UnregisterCudaSharedMemoryRequest(name=name), timeout)

    def _compute(self, rpc, header, ops, outputs, like, timeout, path):
        if path not in (None, "cuda_shm", "shm", "unary", "stream"):
            raise ValueError(
                f"path must be None, 'cuda_shm', 'shm', 'unary' or 'stream', got {path!r}")
        deadline = self._deadline(timeout)
        if not header.request_id:
            header.request_id = "py-" + uuid.uuid4().hex[:16]
        for name, op in ops.items():
            getattr(header, name).CopyFrom(_tensors.tensor_message(op, data=False))
        if path == "cuda_shm" or (path is None and self._cuda_shm_off_reason is None
                                  and _cuda_shm.eligible(ops, like)):
            done = self._via_cuda_shm(rpc, header, ops, outputs, like, deadline,
                                      required=path == "cuda_shm")
            if done is not None:
                return done
        if path in (None, "shm"):
            region = self._shm_region(rpc, ops, outputs, deadline, required=path == "shm")
            if region is not None:
                try:
                    return self._via_shm(rpc, header, ops, outputs, like, deadline, *region)
                finally:
                    self._shm_pool.release(region[0])
        info = self._limits(self._remaining(deadline))
        limit = info.max_unary_bytes
        if path is None:
            estimate = header.ByteSize() + sum(op.nbytes + 32 for op in ops.values())
            past = (estimate >= _PROTOBUF_LIMIT or estimate > _STREAM_ABOVE_BYTES
                    or (limit > 0 and estimate > limit))
            path = "stream" if past else "unary"
        if path == "stream":
            chunk = min(_CHUNK_BYTES, limit) if limit > 0 else _CHUNK_BYTES
            nbytes = sum(op.nbytes for op in ops.values())
            parts = _head_parts(header, ops, len(self._part_streams))
            if parts > 1 and nbytes > _SPLIT_ABOVE_BYTES:
                return self._via_parts(rpc, header, ops, outputs, like, deadline, chunk, parts)
            return self._via_stream(rpc, header, ops, outputs, like, deadline, chunk)
        return self._via_unary(rpc, header, ops, outputs, like, deadline)

    def _shm_region(self, rpc, ops, outputs, deadline, required):
        """A registered region and the call's placement in it, or None (bytes then). required:
        raise instead of None."""
        if self._shm_off_reason is not None:
            if required:
                raise RuntimeError("ringattn: shared memory is off for this client: "
                                   + self._shm_off_reason)
            return None
        placement = _shm.Placement(
            [(n, ops[n].nbytes) for n in rpc.inputs],
            [(n, _tensors.wire_itemsize(w) * int(np.prod(s))) for n, w, s in outputs])
        try:
            region = self._shm_pool.acquire(placement.bytes, self._remaining(deadline))
        except RingAttnError as e:
            refused = e.code in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.FAILED_PRECONDITION,
                                 grpc.StatusCode.UNIMPLEMENTED)
            if self._shm_mode is True or required:
                raise
            if refused:  # for good: the calls go as bytes
                self._shm_off_reason = f"the service refused registration: {e.message}"
                return None
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # regions per caller: bytes this time
                return None
            raise  # the service is unreachable, the deadline passed: the call would fail too
        except OSError as e:
            if self._shm_mode is True or required:
                raise
            self._shm_off_reason = f"cannot create a shared-memory object: {e}"
            return None
        if region is None and required:
            raise RuntimeError("ringattn: every shared-memory region of this client is in use")
        return None if region is None else (region, placement)

    def _via_shm(self, rpc, header, ops, outputs, like, deadline, region, placement):
        t0 = time.perf_counter()
        request = rpc.request()
        request.CopyFrom(header)
        for name in rpc.inputs:
            at, nbytes = placement.slots[name]
            ops[name].write_into(region.view(at, nbytes))
            getattr(request, name).shm.CopyFrom(
                _proto.SharedMemoryRef(region=region.name, offset=at, byte_size=nbytes))
        for name, _, _ in outputs:
            at, nbytes = placement.slots[name]
            request.output_shm[name].CopyFrom(
                _proto.SharedMemoryRef(region=region.name, offset=at, byte_size=nbytes))
        t1 = time.perf_counter()
        response, attempts = self._call_with_retry(
            rpc.name, deadline,
            lambda remaining: self._unary[rpc.name](request, timeout=remaining,
                                                     metadata=self._metadata))
        t2 = time.perf_counter()
        tensors = {}
        for name, wire, shape in outputs:
            _check_output(rpc, response, name, wire, shape, len(getattr(response, name).data),
                          in_shm=True)
            at, nbytes = placement.slots[name]
            src = region.view(at, nbytes)
            tensors[name] = like.lse(src, shape) if name == "lse" else like.tensor(src, wire, shape)
        t3 = time.perf_counter()
        return _Done(tensors, response, "shm", t1 - t0, t2 - t1, t3 - t2, attempts)

    def _via_cuda_shm(self, rpc, header, ops, outputs, like, deadline, required):
        """The call with its tensors in this process's GPU memory, or None when the service
        refuses CUDA shared memory (then the other paths; `required` raises instead)."""
        if not _cuda_shm.eligible(ops, like):
            raise ValueError("path='cuda_shm' needs every input a torch tensor on one CUDA device")
        torch = _tensors._torch()
        t0 = time.perf_counter()
        inputs = {name: ops[name].cuda_tensor() for name in rpc.inputs}
        device = next(iter(inputs.values())).device
        outs = {name: torch.empty(shape, dtype=torch.float32 if name == "lse"
                                  else _tensors._torch_dtype(wire), device=device)
                for name, wire, shape in outputs}
        call = _cuda_shm.Call(self.register_cuda_shared_memory,
                              self.unregister_cuda_shared_memory)
        request = rpc.request()
        request.CopyFrom(header)
        for name, t in inputs.items():
            region, at = call.ref(t, ops[name].nbytes)
            getattr(request, name).shm.CopyFrom(
                _proto.SharedMemoryRef(region=region, offset=at, byte_size=ops[name].nbytes))
        for name, t in outs.items():
            nbytes = t.numel() * t.element_size()
            region, at = call.ref(t, nbytes)
            request.output_shm[name].CopyFrom(
                _proto.SharedMemoryRef(region=region, offset=at, byte_size=nbytes))
        torch.cuda.current_stream(device).synchronize()  # the inputs there before workers read
        try:
            try:
                call.register(self._remaining(deadline))
            except RingAttnError as e:
                if required or e.code not in (grpc.StatusCode.PERMISSION_DENIED,
                                              grpc.StatusCode.FAILED_PRECONDITION,
                                              grpc.StatusCode.UNIMPLEMENTED):
                    raise
                self._cuda_shm_off_reason = f"the service refused registration: {e.message}"
                return None
            t1 = time.perf_counter()
            try:
                response, attempts = self._call_with_retry(
                    rpc.name, deadline,
                    lambda remaining: self._unary[rpc.name](request, timeout=remaining,
                                                             metadata=self._metadata))
            except RingAttnError as e:
                # CPU workers or workers on another host cannot reach GPU memory: for good.
                if required or e.code != grpc.StatusCode.FAILED_PRECONDITION or \
                        "CUDA shared memory" not in e.message:
                    raise
                self._cuda_shm_off_reason = e.message
                return None
            t2 = time.perf_counter()
        finally:
            call.close(self._remaining(deadline))
        tensors = {}
        for name, wire, shape in outputs:
            _check_output(rpc, response, name, wire, shape, len(getattr(response, name).data),
                          in_shm=True)
            tensors[name] = outs[name] if name == "lse" else like.from_device(outs[name])
        t3 = time.perf_counter()
        return _Done(tensors, response, "cuda_shm", t1 - t0, t2 - t1, t3 - t2, attempts)

    def _via_unary(self, rpc, header, ops, outputs, like, deadline):
        t0 = time.perf_counter()
        # Views of the inputs where possible: the message below is their one copy.
        data = {_wire.field_number(rpc.request, name): op.wire_view() for name, op in ops.items()}
        t1 = time.perf_counter()
        request = _wire.encode_request(header, data)
        del data
        raw, attempts = self._call_with_retry(
            rpc.name, deadline,
            lambda remaining: self._raw_unary[rpc.name](request, timeout=remaining,
                                                         metadata=self._metadata))
        meta, tensor_data = _wire.split_message(raw, {_wire.field_number(rpc.response, n): n
                                                      for n in rpc.outputs})
        response = rpc.response.FromString(meta)
        t2 = time.perf_counter()
        tensors = {}
        for name, wire, shape in outputs:
            got = tensor_data.get(name, b"")
            _check_output(rpc, response, name, wire, shape, len(got))
            src = np.frombuffer(got, dtype=np.uint8)
            tensors[name] = like.lse(src, shape) if name == "lse" else like.tensor(src, wire, shape)
        t3 = time.perf_counter()
        return _Done(tensors, response, "unary", t1 - t0, t2 - t1, t3 - t2, attempts)

    def _via_stream(self, rpc, header, ops, outputs, like, deadline, chunk_bytes):
        t0 = time.perf_counter()
        data = [(name, ops[name].wire_view()) for name in rpc.inputs]
        t1 = time.perf_counter()
        response, buffers, attempts = self._stream_call(rpc, header, data, outputs, deadline,
                                                        chunk_bytes, self._streams)
        t2 = time.perf_counter()
        tensors = {}
        for name, wire, shape in outputs:  # the buffers are this call's: no copy where none is due
            src = np.frombuffer(buffers[name], dtype=np.uint8)
            tensors[name] = (like.lse(src, shape, owned=True) if name == "lse"
                             else like.tensor(src, wire, shape, owned=True))
        t3 = time.perf_counter()
        return _Done(tensors, response, "stream", t1 - t0, t2 - t1, t3 - t2, attempts)

    def _stream_call(self, rpc, header, data, outputs, deadline, chunk_bytes, streams,
                     sinks=None):
        """One streamed call: `data` [(name, bytes-like)] in chunks after `header`; the answer's
        header, its outputs' bytes by name (or their `sinks`, _assemble) and the attempts."""
        first = rpc.stream_request(header=header).SerializeToString()
        chunk_field = _wire.field_number(rpc.stream_request, "chunk")

        def requests():
            yield first
            for name, b in data:
                view = memoryview(b)
                which = _which(name)
                for at in range(0, len(b), chunk_bytes):
                    yield _wire.encode_chunk(chunk_field, which, at, view[at:at + chunk_bytes])

        def attempt(remaining):
            call = streams[rpc.name](requests(), timeout=remaining, metadata=self._metadata)
            try:
                return _assemble(rpc, call, outputs, sinks)
            except RingAttnError:
                call.cancel()
                raise

        (response, buffers), attempts = self._call_with_retry(rpc.name + "Stream", deadline,
                                                              attempt)
        return response, buffers, attempts

    def _via_parts(self, rpc, header, ops, outputs, like, deadline, chunk_bytes, parts):
        """The call cut by K/V heads into `parts` streamed calls at once, one per connection
        (attention is independent per head; the C++ client's client/head_split.h)."""
        t0 = time.perf_counter()
        whole = {name: _heads_view(name, np.frombuffer(ops[name].wire_view(), np.uint8), header)
                 for name in rpc.inputs}
        # The results' arrays, which each part's stream writes into where its heads go.
        joined = {name: _heads_view(name, np.empty(_nbytes(wire, shape), np.uint8), header)
                  for name, wire, shape in outputs}
        results = [None] * parts

        def run(p):
            try:
                part = _part_header(rpc, header, p, parts)
                data = [(name, np.ascontiguousarray(_part_of(whole[name], p, parts)).reshape(-1))
                        for name in rpc.inputs]
                outs = [(name, wire, _part_shape(name, shape, parts))
                        for name, wire, shape in outputs]
                sinks = {name: _StridedSink(_part_of(joined[name], p, parts))
                         for name, _, _ in outputs}
                results[p] = self._stream_call(rpc, part, data, outs, deadline, chunk_bytes,
                                               self._part_streams[p], sinks)
            except BaseException as e:  # re-raised on the caller's thread
                results[p] = e

        t1 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(p,)) for p in range(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        t2 = time.perf_counter()
        tensors = {}
        for name, wire, shape in outputs:
            src = joined[name].reshape(-1)  # this call's own array, every part written in
            tensors[name] = (like.lse(src, shape, owned=True) if name == "lse"
                             else like.tensor(src, wire, shape, owned=True))
        slowest = max((r[0] for r in results), key=lambda r: r.timings.total_seconds)
        t3 = time.perf_counter()
        return _Done(tensors, slowest, "stream", t1 - t0, t2 - t1, t3 - t2,
                     max(r[2] for r in results))


_Q_LIKE = ("q", "out", "dout", "dq")
_K_LIKE = ("k", "v", "dk", "dv")


def _head_parts(header, ops, wanted):
    """How many parts by K/V heads a request goes in (<= wanted): the largest divisor of heads_k;
    1 with dropout (its mask depends on the head's index) or without the shapes."""
    if wanted <= 1 or header.options.dropout_p != 0:
        return 1
    q, k = header.q.shape, header.k.shape
    if len(q) != 4 or len(k) != 4 or k[2] <= 0 or q[2] % k[2] != 0:
        return 1
    return max(p for p in range(1, wanted + 1) if k[2] % p == 0)


def _heads_view(name, flat, header, parts=1):
    """`flat` (uint8) as [outer, heads, unit bytes] for tensor `name` of the request `header`
    (q-like [b, s, h, d], k-like [b, s, hk, d], lse [b, h, s] fp32), with heads / parts."""
    b, s, h, d = header.q.shape
    heads = header.k.shape[2] if name in _K_LIKE else h
    if name == "lse":
        return flat.reshape(b, heads // parts, s * 4)
    return flat.reshape(b * s, heads // parts, -1)


def _part_of(view, p, parts):
    per = view.shape[1] // parts
    return view[:, p * per:(p + 1) * per, :]


class _StridedSink:
    """Where a part's stream of one tensor lands: the part's bytes, contiguous on the wire, go
    straight into its strided place in the whole result, so that no join copy follows. `view`:
    [outer, heads, unit] uint8, one part's heads of each outer row (contiguous within it)."""

    def __init__(self, view):
        outer, heads, unit = view.shape
        if view.strides[2] != 1 or (heads > 1 and view.strides[1] != unit):
            raise ValueError("a part's heads must be contiguous within each row")
        self.row_bytes = heads * unit
        self.rows = np.lib.stride_tricks.as_strided(  # [outer, row_bytes], a view
            view, shape=(outer, self.row_bytes), strides=(view.strides[0], 1))
        self.nbytes = outer * self.row_bytes

    def write(self, offset, data):
        """data (bytes-like) at byte `offset` of the part's contiguous layout."""
        src = np.frombuffer(data, dtype=np.uint8)
        rb = self.row_bytes
        at, end = offset, offset + len(src)
        while at < end:
            r, c = divmod(at, rb)
            if c == 0 and end - at >= rb:  # whole rows at once
                whole = (end - at) // rb
                self.rows[r:r + whole] = src[at - offset:at - offset + whole * rb].reshape(whole, rb)
                at += whole * rb
            else:  # the part of a row the chunk starts or ends in
                take = min(rb - c, end - at)
                self.rows[r, c:c + take] = src[at - offset:at - offset + take]
                at += take


def _part_shape(name, shape, parts):
    shape = list(shape)
    shape[1 if name == "lse" else 2] //= parts
    return tuple(shape)


def _part_header(rpc, header, p, parts):
    part = rpc.request()
    part.CopyFrom(header)
    heads = header.q.shape[2]
    if len(header.options.alibi_slopes) == heads:
        per = heads // parts
        del part.options.alibi_slopes[:]
        part.options.alibi_slopes.extend(header.options.alibi_slopes[p * per:(p + 1) * per])
    for name in rpc.inputs:
        t = getattr(part, name)
        t.shape[:] = _part_shape(name, tuple(t.shape), parts)
    return part


def _nbytes(wire, shape):
    return _tensors.wire_itemsize(wire) * int(np.prod(shape))


class _Done:
    def __init__(self, tensors, response, path, input_copy, call, output_copy, attempts):
        self.tensors = tensors
        timings = response.timings
        timings.client_seconds = call
        timings.client_wire_seconds = max(0.0, call - timings.total_seconds)
        self._info = dict(timings=timings, plan=response.plan, request_id=response.request_id,
                          path=path, input_copy_seconds=input_copy,
                          output_copy_seconds=output_copy, attempts=attempts)

    def info(self):
        """CallInfo's fields."""
        return self._info


def _expected_bytes(tensor):
    n = {_tensors.wire_enum(w): _tensors.wire_itemsize(w) for w in _tensors.WIRE_DTYPES}.get(
        tensor.dtype, 0)
    for d in tensor.shape:
        n *= d
    return n


def _check_output(rpc, response, name, wire, shape, got_bytes, in_shm=False):
    """The response's output `name` has the dtype and shape the request implies, and got_bytes
    of data: its bytes, or none when it is in shared memory; INTERNAL naming it if not."""
    if name == "lse" and not response.HasField("lse"):
        raise error(grpc.StatusCode.INTERNAL, "response has no lse; the request asked for it",
                    rpc.name)
    t = getattr(response, name)
    if t.dtype != _tensors.wire_enum(wire) or tuple(t.shape) != tuple(shape):
        raise error(grpc.StatusCode.INTERNAL,
                    f"response {name} is {list(t.shape)} {_proto.enum_name('DType', t.dtype)}; "
                    f"expected {list(shape)} DTYPE_{wire.upper()}", rpc.name)
    want = 0 if in_shm else _expected_bytes(t)
    if got_bytes != want:
        raise error(grpc.StatusCode.INTERNAL,
                    f"response {name} carries {got_bytes} bytes; expected {want}", rpc.name)


def _assemble(rpc, call, outputs, sinks=None):
    """The stream's header and each output's bytes (bytearray) from the serialised response
    messages `call` yields, checked as the C++ client's StreamAssembler checks them: INTERNAL
    naming the tensor on any breach. `sinks` ({name: _StridedSink}), where given, receive their
    tensor's bytes instead (its entry in the returned dict is then the sink)."""
    what = rpc.name + "Stream response"
    expected = {name: (wire, shape) for name, wire, shape in outputs}
    by_which = {_which(name): name for name in expected}

    def breach(message):
        return error(grpc.StatusCode.INTERNAL, f"{what}: {message}", rpc.name + "Stream")

    header_field = _wire.field_number(rpc.stream_response, "header")
    chunk_field = _wire.field_number(rpc.stream_response, "chunk")
    header = None
    buffers, filled, order = {}, {}, []
    for raw in call:
        try:
            part, value = _wire.decode_stream_message(raw, header_field, chunk_field)
        except (ValueError, IndexError) as e:
            raise breach(f"a message that does not parse: {e}") from None
        if part == "header":
            if header is not None:
                raise breach("a second header; only one header is allowed")
            try:
                header = rpc.response.FromString(bytes(value))
            except Exception as e:  # protobuf's DecodeError
                raise breach(f"a header that does not parse: {e}") from None
            for name, (wire, shape) in expected.items():
                if name == "lse" and not header.HasField("lse"):
                    continue
                t = getattr(header, name)
                if t.data:
                    raise breach(f"header: {name} carries data")
                if t.dtype != _tensors.wire_enum(wire) or tuple(t.shape) != tuple(shape):
                    raise breach(f"header: {name} is {list(t.shape)}; expected {list(shape)}")
                want = _expected_bytes(t)
                sink = (sinks or {}).get(name)
                if sink is not None and sink.nbytes != want:
                    raise breach(f"header: {name} has {want} bytes; its place holds {sink.nbytes}")
                buffers[name] = sink if sink is not None else bytearray(want)
                filled[name] = 0
                order.append(name)
        elif part == "chunk":
            if header is None:
                raise breach("must start with a header message; got a chunk before the header")
            which, offset, data = value
            name = by_which.get(which)
            if name is None or name not in buffers:
                raise breach(f"a chunk of tensor {which}, which this call does not return")
            done_before = all(filled[n] == _size_of(buffers[n]) for n in order[:order.index(name)])
            if not done_before or offset != filled[name]:
                raise breach(f"{name} chunk at offset {offset}; expected {filled[name]}")
            end = offset + len(data)
            size = _size_of(buffers[name])
            if end > size:
                raise breach(f"{name} chunk ends at {end}, past its {size} bytes")
            if isinstance(buffers[name], _StridedSink):
                buffers[name].write(offset, data)
            else:
                buffers[name][offset:end] = data
            filled[name] = end
        else:
            raise breach("a message with neither header nor chunk")
    if header is None:
        raise breach("must start with a header message; got no message")
    for name in order:
        if filled[name] != _size_of(buffers[name]):
            raise breach(f"{name} has {filled[name]} of its {_size_of(buffers[name])} bytes")
    if "lse" in expected and "lse" not in buffers:
        raise breach("header has no lse; the request asked for it")
    return header, buffers


def _size_of(buffer):
    return buffer.nbytes if isinstance(buffer, _StridedSink) else len(buffer)


def _check_format(fmt):
    if fmt not in _tensors.FORMATS:
        raise ValueError(f"qkv_format must be one of {_tensors.FORMATS}, got {fmt!r}")
    return fmt


def _check_wire(wire):
    if wire not in _tensors.WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {_tensors.WIRE_DTYPES}, got {wire!r}")


def _layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(_LAYOUTS)}, got {layout!r}")
    return _proto.enum_value("Layout", _LAYOUTS[layout])


def _options(causal, window, alibi_slopes, softcap, softmax_scale, dropout_p, dropout_seed,
             cu_seqlens):
    o = _proto.AttentionOptions(causal=bool(causal), softcap=float(softcap),
                                dropout_p=float(dropout_p), dropout_seed=int(dropout_seed))
    if window is None:
        window = (-1, -1)
    left, right = window
    if left is not None and int(left) != -1:
        o.window_left = int(left)
    if right is not None and int(right) != -1:
        o.window_right = int(right)
    if softmax_scale is not None:
        o.softmax_scale = float(softmax_scale)
    o.alibi_slopes.extend(float(x) for x in _tensors.as_list(alibi_slopes, "alibi_slopes"))
    o.cu_seqlens.extend(int(x) for x in _tensors.as_list(cu_seqlens, "cu_seqlens"))
    return o


def connect(target="127.0.0.1:50051", **kwargs) -> Client:
    """Client(target, **kwargs)."""
    return Client(target, **kwargs)


_live_clients = weakref.WeakSet()


@atexit.register
def _close_live_clients():
    for client in list(_live_clients):
        try:
            client._shm_pool.close(timeout=2.0)
        except Exception:  # exiting: the service may be gone
            pass


_default_lock = threading.Lock()
_default: Optional[Client] = None


def default_client() -> Client:
    """The process's shared client: set_default_client's, else one to $RINGATTN_TARGET
    (default 127.0.0.1:50051) made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            import os
            _default = Client(os.environ.get("RINGATTN_TARGET", "127.0.0.1:50051"))
        return _default


def set_default_client(client) -> None:
    """Makes `client` (a Client or a target string) the one default_client returns."""
    global _default
    with _default_lock:
        _default = Client(client) if isinstance(client, str) else client
