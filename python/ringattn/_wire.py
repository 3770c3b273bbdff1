"""Protocol-buffer wire format for the tensor bytes, so that they are copied once on each side
rather than four times through the protobuf runtime (set, serialise; parse, read back).

A request is its header (the message without tensor data, serialised by protobuf) followed by
one more occurrence of each tensor field carrying only `data`: the parser merges repeated
occurrences of a message field, so the service reads one message. A response is split into its
tensors' data (memoryviews into the received bytes, no copy) and the rest, which protobuf
parses. Stream chunks are written and read the same way.
"""
from . import _proto

_LEN = 2
_TENSOR_DATA = _proto.Tensor.DESCRIPTOR.fields_by_name["data"].number


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number, wire_type):
    return varint(number << 3 | wire_type)


def _read_varint(buf, at):
    shift = result = 0
    while True:
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start, end):
    """(number, wire_type, value_start, value_end, field_start) of each field in buf[start:end];
    a varint's value span is its bytes."""
    at = start
    while at < end:
        field_start = at
        key, at = _read_varint(buf, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, nxt = _read_varint(buf, at)
        elif wire_type == 1:
            nxt = at + 8
        elif wire_type == 5:
            nxt = at + 4
        elif wire_type == _LEN:
            length, at = _read_varint(buf, at)
            nxt = at + length
        else:
            raise ValueError(f"wire type {wire_type} of field {number} is not supported")
        if nxt > end:
            raise ValueError(f"field {number} runs past its message")
        yield number, wire_type, at, nxt, field_start
        at = nxt


def field_number(message_class, name):
    return message_class.DESCRIPTOR.fields_by_name[name].number


def tensor_data_pieces(number, data):
    """Pieces (to b"".join) of message field `number` holding a Tensor with only `data`."""
    inner_prefix = _key(_TENSOR_DATA, _LEN) + varint(len(data))
    return [_key(number, _LEN) + varint(len(inner_prefix) + len(data)) + inner_prefix, data]


def encode_request(header, data_by_field):
    """The serialised request: `header` (a message without tensor data) and {field number:
    bytes-like} tensor data."""
    pieces = [header.SerializeToString()]
    for number, data in data_by_field.items():
        pieces += tensor_data_pieces(number, data)
    return b"".join(pieces)


def split_message(raw, tensor_fields):
    """raw (bytes) of a message whose fields `tensor_fields` ({number: name}) are Tensors:
    (the message's bytes without their data, {name: memoryview of the data})."""
    view = memoryview(raw)
    rest = []
    data = {}
    for number, wire_type, start, end, field_start in _fields(view, 0, len(view)):
        name = tensor_fields.get(number)
        if name is None or wire_type != _LEN:
            rest.append(view[field_start:end])
            continue
        inner = []
        for n, wt, s, e, fs in _fields(view, start, end):
            if n == _TENSOR_DATA and wt == _LEN:
                data[name] = view[s:e]  # the last occurrence wins, as protobuf's
            else:
                inner.append(view[fs:e])
        body = b"".join(inner)
        rest.append(_key(number, _LEN) + varint(len(body)) + body)
    return b"".join(rest), data


def encode_chunk(oneof_number, which, offset, data):
    """A stream message whose `chunk` (field oneof_number) is TensorChunk{which, offset, data}."""
    inner = (_key(1, 0) + varint(which) + _key(2, 0) + varint(offset) + _key(3, _LEN)
             + varint(len(data)))
    return b"".join([_key(oneof_number, _LEN), varint(len(inner) + len(data)), inner, data])


def decode_stream_message(raw, header_number, chunk_number):
    """("header", header bytes) or ("chunk", (which, offset, memoryview data)) or (None, None)
    for a stream response message."""
    view = memoryview(raw)
    kind, value = None, None
    for number, wire_type, start, end, _ in _fields(view, 0, len(view)):
        if wire_type != _LEN:
            continue
        if number == header_number:
            kind, value = "header", view[start:end]
        elif number == chunk_number:
            which = offset = 0
            data = view[0:0]
            for n, wt, s, e, _ in _fields(view, start, end):
                if n == 1 and wt == 0:
                    which = _read_varint(view, s)[0]
                elif n == 2 and wt == 0:
                    offset = _read_varint(view, s)[0]
                elif n == 3 and wt == _LEN:
                    data = view[s:e]
            kind, value = "chunk", (which, offset, data)
    return kind, value
