"""The part of Envoy's ext_proc API the picker speaks, as protobuf message classes.

Why not the `xds-protos` wheel (gRPC's generated Envoy API): it also installs its own copies of
`opentelemetry/proto/*` and `google/api/*` over those of `opentelemetry-proto` and
`googleapis-common-protos`, which MLServer imports; in one environment with MLServer, installing
it broke `import mlserver` (an older `common_pb2` without `InstrumentationScope`). So the few
messages used here are declared below, field numbers and types as in Envoy's
`envoy/service/ext_proc/v3/external_processor.proto` (Envoy 1.40), in a private descriptor pool:
no generated code, no clash with any other package's protobuf symbols. Enums are declared as
int32 (the same varint on the wire). Fields the picker neither reads nor writes are left out;
protobuf skips them when parsing.

Field numbers were compared one by one with xds-protos 1.85.0's descriptors when this was
written; a real Envoy (tests/support/envoy.py) is the end-to-end check.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

_T = descriptor_pb2.FieldDescriptorProto
_TYPES = {"string": _T.TYPE_STRING, "bytes": _T.TYPE_BYTES, "bool": _T.TYPE_BOOL, "int32": _T.TYPE_INT32,
          "uint32": _T.TYPE_UINT32}

# message full name -> [(field, number, type or .message, repeated, oneof)]
_CORE, _EP = "envoy.config.core.v3", "envoy.service.ext_proc.v3"


def _per_phase(first: int, oneof: str, headers: str, body: str, trailers: str) -> list[tuple[str, int, str, bool, str]]:
    """The oneof both ProcessingRequest and ProcessingResponse open with: request_headers,
    response_headers, request_body, response_body, request_trailers, response_trailers, numbered
    from `first` in that order, each of the ext_proc message type given for its part."""
    kinds = (headers, headers, body, body, trailers, trailers)
    names = [f"{side}_{part}" for part in ("headers", "body", "trailers") for side in ("request", "response")]
    return [(name, first + i, f".{_EP}.{kind}", False, oneof) for i, (name, kind) in enumerate(zip(names, kinds))]


_SCHEMA: dict[str, list[tuple[str, int, str, bool, str | None]]] = {
    f"{_CORE}.HeaderValue": [("key", 1, "string", False, None), ("value", 2, "string", False, None),
                             ("raw_value", 3, "bytes", False, None)],
    f"{_CORE}.HeaderMap": [("headers", 1, f".{_CORE}.HeaderValue", True, None)],
    f"{_CORE}.HeaderValueOption": [("header", 1, f".{_CORE}.HeaderValue", False, None),
                                   ("append_action", 3, "int32", False, None)],
    f"{_CORE}.Metadata": [("filter_metadata", 1, f".{_CORE}.Metadata.FilterMetadataEntry", True, None)],
    "envoy.type.v3.HttpStatus": [("code", 1, "int32", False, None)],
    "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode": [
        ("request_header_mode", 1, "int32", False, None), ("response_header_mode", 2, "int32", False, None),
        ("request_body_mode", 3, "int32", False, None), ("response_body_mode", 4, "int32", False, None),
        ("request_trailer_mode", 5, "int32", False, None), ("response_trailer_mode", 6, "int32", False, None)],
    f"{_EP}.HttpHeaders": [("headers", 1, f".{_CORE}.HeaderMap", False, None), ("end_of_stream", 3, "bool", False, None)],
    f"{_EP}.HttpBody": [("body", 1, "bytes", False, None), ("end_of_stream", 2, "bool", False, None)],
    f"{_EP}.HttpTrailers": [("trailers", 1, f".{_CORE}.HeaderMap", False, None)],
    f"{_EP}.ProcessingRequest": [
        *_per_phase(2, "request", "HttpHeaders", "HttpBody", "HttpTrailers"),
        ("metadata_context", 8, f".{_CORE}.Metadata", False, None),
        ("observability_mode", 10, "bool", False, None)],
    f"{_EP}.HeaderMutation": [("set_headers", 1, f".{_CORE}.HeaderValueOption", True, None),
                              ("remove_headers", 2, "string", True, None)],
    f"{_EP}.CommonResponse": [("status", 1, "int32", False, None),
                              ("header_mutation", 2, f".{_EP}.HeaderMutation", False, None),
                              ("clear_route_cache", 5, "bool", False, None)],
    f"{_EP}.HeadersResponse": [("response", 1, f".{_EP}.CommonResponse", False, None)],
    f"{_EP}.BodyResponse": [("response", 1, f".{_EP}.CommonResponse", False, None)],
    f"{_EP}.TrailersResponse": [("header_mutation", 1, f".{_EP}.HeaderMutation", False, None)],
    f"{_EP}.GrpcStatus": [("status", 1, "uint32", False, None)],
    f"{_EP}.ImmediateResponse": [("status", 1, ".envoy.type.v3.HttpStatus", False, None),
                                 ("headers", 2, f".{_EP}.HeaderMutation", False, None),
                                 ("body", 3, "bytes", False, None),
                                 ("grpc_status", 4, f".{_EP}.GrpcStatus", False, None),
                                 ("details", 5, "string", False, None)],
    f"{_EP}.ProcessingResponse": [
        *_per_phase(1, "response", "HeadersResponse", "BodyResponse", "TrailersResponse"),
        ("immediate_response", 7, f".{_EP}.ImmediateResponse", False, "response"),
        ("dynamic_metadata", 8, ".google.protobuf.Struct", False, None),
        ("mode_override", 9, ".envoy.extensions.filters.http.ext_proc.v3.ProcessingMode", False, None)],
}

PROCESS_METHOD = f"/{_EP}.ExternalProcessor/Process"
# ProcessingMode.BodySendMode values used here
BODY_BUFFERED = 2
# HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
OVERWRITE_IF_EXISTS_OR_ADD = 2


def _field(name: str, number: int, kind: str, repeated: bool, oneof: int | None) -> descriptor_pb2.FieldDescriptorProto:
    f = _T(name=name, number=number, label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
    if kind.startswith("."):
        f.type, f.type_name = _T.TYPE_MESSAGE, kind
    else:
        f.type = _TYPES[kind]
    if oneof is not None:
        f.oneof_index = oneof
    return f


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(struct_pb2.DESCRIPTOR.serialized_pb))
    by_package: dict[str, list[str]] = {}
    for full in _SCHEMA:
        by_package.setdefault(full.rsplit(".", 1)[0], []).append(full)
    # dependencies first: core types, then the ones that use them
    order = [_CORE, "envoy.type.v3", "envoy.extensions.filters.http.ext_proc.v3", _EP]
    for package in order:
        fd = descriptor_pb2.FileDescriptorProto(name=f"modelshelf/picker/{package.replace('.', '/')}.proto",
                                                package=package, syntax="proto3")
        fd.dependency.append("google/protobuf/struct.proto")
        fd.dependency.extend(f"modelshelf/picker/{p.replace('.', '/')}.proto" for p in order[:order.index(package)])
        for full in by_package[package]:
            msg = fd.message_type.add(name=full.rsplit(".", 1)[1])
            oneofs: list[str] = []
            for name, number, kind, repeated, oneof in _SCHEMA[full]:
                index = None
                if oneof is not None:
                    if oneof not in oneofs:
                        oneofs.append(oneof)
                        msg.oneof_decl.add(name=oneof)
                    index = oneofs.index(oneof)
                msg.field.append(_field(name, number, kind, repeated, index))
            if full == f"{_CORE}.Metadata":  # map<string, google.protobuf.Struct> filter_metadata = 1
                entry = msg.nested_type.add(name="FilterMetadataEntry")
                entry.options.map_entry = True
                entry.field.append(_field("key", 1, "string", False, None))
                entry.field.append(_field("value", 2, ".google.protobuf.Struct", False, None))
        pool.Add(fd)
    return pool


_POOL = _build_pool()


def _cls(full: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full))


HeaderValue = _cls(f"{_CORE}.HeaderValue")
HeaderValueOption = _cls(f"{_CORE}.HeaderValueOption")
HeaderMap = _cls(f"{_CORE}.HeaderMap")
Metadata = _cls(f"{_CORE}.Metadata")
ProcessingMode = _cls("envoy.extensions.filters.http.ext_proc.v3.ProcessingMode")
HttpHeaders = _cls(f"{_EP}.HttpHeaders")
HttpBody = _cls(f"{_EP}.HttpBody")
ProcessingRequest = _cls(f"{_EP}.ProcessingRequest")
ProcessingResponse = _cls(f"{_EP}.ProcessingResponse")
HeaderMutation = _cls(f"{_EP}.HeaderMutation")
CommonResponse = _cls(f"{_EP}.CommonResponse")
HeadersResponse = _cls(f"{_EP}.HeadersResponse")
BodyResponse = _cls(f"{_EP}.BodyResponse")
TrailersResponse = _cls(f"{_EP}.TrailersResponse")
ImmediateResponse = _cls(f"{_EP}.ImmediateResponse")
Struct = _cls("google.protobuf.Struct")
