"""KServe V1 <-> V2 translation (pure functions; no agent imports, so a worker process that
runs them starts small).

  {"instances": [row, ...]}  ->  one V2 input "input-0", shape [len(instances), *row shape],
                                 datatype BOOL/INT64/FP64/BYTES from the values, data row-major
  V2 answer                  ->  {"predictions": [...]} from the output named "predict"
                                 (MLServer's sklearn/xgboost runtimes) or else the first output

Bounded: rows must be non-empty and of one shape, values of one kind, nesting at most
MAX_DEPTH levels; anything else is a ValueError whose message a client can act on. The common
case (rows of scalars) is checked and flattened with C-level passes (map/set/chain), not a
Python loop per value.
"""
from __future__ import annotations

import json
from itertools import chain
from typing import Any

MAX_DEPTH = 32  # nesting levels of "instances"

_DATATYPES = {
    frozenset({bool}): "BOOL",
    frozenset({int}): "INT64",
    frozenset({float}): "FP64",
    frozenset({int, float}): "FP64",
    frozenset({str}): "BYTES",
}


def _datatype(values: list[Any]) -> str:
    datatype = _DATATYPES.get(frozenset(map(type, values)))  # one pass, in C
    if datatype is None:
        raise ValueError("instances must hold numbers, booleans or strings of one kind")
    return datatype


def _shape_and_flat(value: Any, depth: int = 0) -> tuple[list[int], list[Any]]:
    if not isinstance(value, list):
        return [], [value]
    if not value:
        raise ValueError("instances hold an empty list: every row needs at least one value")
    if depth >= MAX_DEPTH:
        raise ValueError(f"instances are nested deeper than {MAX_DEPTH} levels")
    kinds = set(map(type, value))
    if list not in kinds:
        return [len(value)], value  # a row of scalars (their kind is checked by _datatype)
    if kinds != {list} or len(set(map(len, value))) != 1:
        raise ValueError("instances are ragged: every row must have the same shape")
    flat = list(chain.from_iterable(value))
    if not flat:
        raise ValueError("instances hold an empty list: every row needs at least one value")
    if list not in set(map(type, flat)):  # rows of scalars: the common case
        return [len(value), len(value[0])], flat
    shapes_flats = [_shape_and_flat(v, depth + 1) for v in value]
    inner = shapes_flats[0][0]
    if any(s != inner for s, _ in shapes_flats):
        raise ValueError("instances are ragged: every row must have the same shape")
    return [len(value), *inner], list(chain.from_iterable(f for _, f in shapes_flats))


def v1_to_v2(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or "instances" not in doc:
        raise ValueError('expected {"instances": [...]}')
    instances = doc["instances"]
    if not isinstance(instances, list) or not instances:
        raise ValueError('"instances" must be a non-empty list')
    shape, flat = _shape_and_flat(instances)
    if len(shape) == 1:  # a list of scalars: one feature per instance
        shape = [shape[0], 1]
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": _datatype(flat), "data": flat}]}


def translate_v1_request(raw: bytes) -> bytes:
    """A V1 predict body -> the V2 infer body. ValueError with a reason when it is not one."""
    try:
        doc = json.loads(raw or b"{}")
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON: {type(e).__name__} at {getattr(e, 'pos', '?')}") from None
    return json.dumps(v1_to_v2(doc)).encode()


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def v2_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    outputs = doc["outputs"]
    chosen = next((o for o in outputs if o.get("name") == "predict"), outputs[0])
    data = chosen["data"]
    shape = chosen.get("shape") or [len(data)]
    predictions = _reshape(data, shape)
    if len(shape) == 2 and shape[1] == 1:
        predictions = [row[0] for row in predictions]
    return {"predictions": predictions}


def translate_v2_response(payload: bytes) -> bytes:
    """A V2 infer answer -> the V1 predict answer (JSON bytes). KeyError/TypeError/ValueError
    when the answer has no usable output."""
    return json.dumps(v2_to_v1(json.loads(payload))).encode()
