"""Just enough of the protobuf wire format for the gRPC data plane: read a request's model name
and version, name another model, and write the one-bool answers the agent gives itself.

Every model RPC of `inference.GRPCInferenceService` (KServe's ModelReady, ModelMetadata,
ModelInfer; Triton's ModelConfig, ModelStatistics, ModelStreamInfer) carries the model's name as
string field 1 and its version as string field 2 (agent/grpc_proto/grpc_predict_v2.proto). The
agent reads those two fields by walking the message's top-level fields, skipping every other
one by its length, so tensor payloads are never decoded or copied.

Why not generated message classes: the agent would decode a whole ModelInferRequest (tensors
included) to read one string, and classes generated from KServe's proto under package
`inference` cannot share a process's default descriptor pool with tritonclient's (Triton's proto
defines the same message names in another file).

Protobuf parsers keep the LAST value of a repeated scalar field, so a name appended to the end
of a message replaces the one inside it (`with_name`): no re-encoding of the rest.
"""
from __future__ import annotations

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a protobuf message."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def name_and_version(msg: bytes) -> tuple[str, str]:
    """String fields 1 and 2 of `msg` ("" when absent). WireError when `msg` is malformed."""
    name = version = b""
    i, end = 0, len(msg)
    while i < end:
        key, i = _varint(msg, i)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            size, i = _varint(msg, i)
            if i + size > end:
                raise WireError(f"field {field} runs past the end of the message")
            if field == 1:
                name = msg[i:i + size]
            elif field == 2:
                version = msg[i:i + size]
            i += size
        elif wire == _VARINT:
            _, i = _varint(msg, i)
        elif wire == _I64:
            i += 8
        elif wire == _I32:
            i += 4
        else:
            raise WireError(f"unsupported wire type {wire} in field {field}")
    if i > end:
        raise WireError("truncated fixed-size field")
    try:
        return name.decode(), version.decode()
    except UnicodeDecodeError:
        raise WireError("model name or version is not UTF-8") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def with_name(msg: bytes, name: str) -> bytes:
    """`msg` with string field 1 set to `name` (appended: the last value wins)."""
    raw = name.encode()
    return msg + b"\x0a" + _encode_varint(len(raw)) + raw


def bool_message(value: bool) -> bytes:
    """A message whose only field is bool field 1 (ServerLive/ServerReady/ModelReadyResponse)."""
    return b"\x08\x01" if value else b""
