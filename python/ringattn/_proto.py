"""The public API's messages and RPC paths, made from the descriptor set of proto/ (see
_build_proto.py) in a pool of their own, so that they never clash with other generated code.

Where the descriptor comes from, first found:
  1. $RINGATTN_DESCRIPTOR (a file made ahead of time, e.g. CMake's build/python/ringattn_v1.desc);
  2. ringattn/_generated/ringattn_v1.desc, made when the package was built (pip install), or in a
     source checkout made here from ../proto on first import and again whenever proto/ changed.
"""
import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from . import _build_proto

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_GENERATED = os.path.join(_PACKAGE_DIR, "_generated", _build_proto.DESCRIPTOR_NAME)
SERVICE = "ringattn.v1.AttentionService"


def _descriptor_path():
    env = os.environ.get("RINGATTN_DESCRIPTOR")
    if env:
        if not os.path.isfile(env):
            raise ImportError(f"ringattn: RINGATTN_DESCRIPTOR={env} does not exist")
        return env
    proto_dir = _build_proto.default_proto_dir()
    digest_path = _GENERATED + ".sha256"
    if os.path.isfile(os.path.join(proto_dir, _build_proto.PROTO_FILE)):
        # A source checkout: the descriptor must be that of the proto beside it.
        digest = _build_proto.proto_digest(proto_dir)
        current = None
        if os.path.isfile(_GENERATED) and os.path.isfile(digest_path):
            with open(digest_path) as f:
                current = f.read().strip()
        if current != digest:
            try:
                _build_proto.build(_GENERATED, proto_dir)
            except RuntimeError as e:
                raise ImportError(str(e)) from None
            with open(digest_path + ".tmp", "w") as f:
                f.write(digest + "\n")
            os.replace(digest_path + ".tmp", digest_path)
        return _GENERATED
    if os.path.isfile(_GENERATED):
        return _GENERATED
    raise ImportError(
        "ringattn: the API descriptor is missing: install the package with `pip install ./python` "
        "from the repository, or set RINGATTN_DESCRIPTOR to one made by "
        "`python3 python/ringattn/_build_proto.py OUT.desc`")


def _message_class(descriptor):
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:
        return get(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def _load():
    with open(_descriptor_path(), "rb") as f:
        files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _load()


def message(name):
    """The class of message ringattn.v1.`name`."""
    return _message_class(POOL.FindMessageTypeByName("ringattn.v1." + name))


def enum_value(enum, name):
    """The number of value `name` of enum ringattn.v1.`enum`."""
    return POOL.FindEnumTypeByName("ringattn.v1." + enum).values_by_name[name].number


def enum_name(enum, number):
    return POOL.FindEnumTypeByName("ringattn.v1." + enum).values_by_number[number].name


def method_path(rpc):
    """'/ringattn.v1.AttentionService/Attend' for 'Attend'; KeyError for an RPC the API lacks."""
    POOL.FindServiceByName(SERVICE).methods_by_name[rpc]  # noqa: B018 (checks the name)
    return f"/{SERVICE}/{rpc}"


Tensor = message("Tensor")
SharedMemoryRef = message("SharedMemoryRef")
AttentionOptions = message("AttentionOptions")
AttendRequest = message("AttendRequest")
AttendResponse = message("AttendResponse")
AttendStreamRequest = message("AttendStreamRequest")
AttendStreamResponse = message("AttendStreamResponse")
AttendBackwardRequest = message("AttendBackwardRequest")
AttendBackwardResponse = message("AttendBackwardResponse")
AttendBackwardStreamRequest = message("AttendBackwardStreamRequest")
AttendBackwardStreamResponse = message("AttendBackwardStreamResponse")
TensorChunk = message("TensorChunk")
InfoRequest = message("InfoRequest")
InfoResponse = message("InfoResponse")
Timings = message("Timings")
RegisterSystemSharedMemoryRequest = message("RegisterSystemSharedMemoryRequest")
RegisterSystemSharedMemoryResponse = message("RegisterSystemSharedMemoryResponse")
UnregisterSystemSharedMemoryRequest = message("UnregisterSystemSharedMemoryRequest")
UnregisterSystemSharedMemoryResponse = message("UnregisterSystemSharedMemoryResponse")
SystemSharedMemoryStatusRequest = message("SystemSharedMemoryStatusRequest")
SystemSharedMemoryStatusResponse = message("SystemSharedMemoryStatusResponse")
RegisterCudaSharedMemoryRequest = message("RegisterCudaSharedMemoryRequest")
RegisterCudaSharedMemoryResponse = message("RegisterCudaSharedMemoryResponse")
UnregisterCudaSharedMemoryRequest = message("UnregisterCudaSharedMemoryRequest")
UnregisterCudaSharedMemoryResponse = message("UnregisterCudaSharedMemoryResponse")
