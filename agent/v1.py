"""KServe V1 <-> V2 translation (pure functions; no agent imports, so a worker process that
runs them starts small).

  {"instances": [row, ...]}  ->  one V2 input "input-0", shape [len(instances), *row shape],
                                 datatype BOOL/INT64/FP64/BYTES from the values, data row-major
  {"inputs": ...}            ->  the same: KServe's V1 server reads "inputs" as an alias of
                                 "instances" (and prefers it when both are there)
  dict instances (KServe builds a pandas DataFrame from each and concatenates them):
    {"instances": [{"a": 1, "b": 2}, ...]}            records: one row per dict
    {"instances": [{"a": [1, 3], "b": [2, 4]}]}        columnar: one row per list item
    {"instances": [{"a": {"0": 1}, "b": {"0": 2}}]}    pandas' to_dict() (KServe's lightgbm doc)
    {"instances": [[{"a": 1, "b": 2}, ...]]}           a list of records per instance
    {"inputs": {"a": [1, 3], "b": [2, 4]}}             columnar at the top (TF Serving's form)
                             ->  one V2 input per column, named by it, shape [rows, 1], in the
                                 first instance's column order, with the request parameter
                                 content_type "pd" (MLServer decodes it as a DataFrame, as KServe
                                 does); every instance must name the same columns
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


def _rows(instance: Any, index: int) -> list[dict[str, Any]] | dict[str, list[Any]]:
    """One instance as a list of records or as columns (column -> values)."""
    if isinstance(instance, list):
        if not instance or not all(isinstance(r, dict) for r in instance):
            raise ValueError(f"instance {index}: a list in dict instances must hold records (objects)")
        return instance
    if not isinstance(instance, dict) or not instance:
        raise ValueError(f"instance {index}: expected an object of columns like the first instance")
    kinds = set(map(type, instance.values()))
    if not kinds & {list, dict}:
        return [instance]  # a record of scalars: one row
    if not kinds <= {list, dict}:
        raise ValueError(f"instance {index}: mixes scalar and list/object columns")
    columns = {k: list(v.values()) if isinstance(v, dict) else v for k, v in instance.items()}
    if len(set(map(len, columns.values()))) != 1:
        raise ValueError(f"instance {index}: columns of different lengths")
    return columns


def _columns_to_v2(instances: list[Any]) -> dict[str, Any]:
    """Dict instances (records, columns or pandas' to_dict form) -> one V2 input per column."""
    names: list[str] = []
    columns: dict[str, list[Any]] = {}
    for index, instance in enumerate(instances):
        part = _rows(instance, index)
        if isinstance(part, list):  # records
            keys = list(part[0])
            if not names:
                names = keys
                columns = {k: [] for k in names}
            for record in part:
                if set(record) != set(names):
                    raise ValueError(f"instance {index}: columns {sorted(record)[:8]} differ from {names[:8]}")
                for k in names:
                    columns[k].append(record[k])
        else:
            if not names:
                names = list(part)
                columns = {k: [] for k in names}
            if set(part) != set(names):
                raise ValueError(f"instance {index}: columns {sorted(part)[:8]} differ from {names[:8]}")
            for k in names:
                columns[k].extend(part[k])
    inputs = []
    for name in names:
        values = columns[name]
        if not values:
            raise ValueError(f"column {name!r} has no values")
        if list in set(map(type, values)) or dict in set(map(type, values)):
            raise ValueError(f"column {name!r} holds nested values: each cell must be a number, boolean or string")
        inputs.append({"name": str(name), "shape": [len(values), 1], "datatype": _datatype(values), "data": values})
    return {"parameters": {"content_type": "pd"}, "inputs": inputs}


def v1_to_v2(doc: Any) -> dict[str, Any]:
    key = "inputs" if isinstance(doc, dict) and "inputs" in doc else "instances"
    if not isinstance(doc, dict) or key not in doc:
        raise ValueError('expected {"instances": [...]} or {"inputs": [...]}')
    instances = doc[key]
    if isinstance(instances, dict) and instances:  # columnar at the top: {"inputs": {"a": [...], ...}}
        return _columns_to_v2([instances])
    if not isinstance(instances, list) or not instances:
        raise ValueError(f'"{key}" must be a non-empty list')
    first = instances[0]
    if isinstance(first, dict) or (isinstance(first, list) and first and isinstance(first[0], dict)):
        return _columns_to_v2(instances)
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
