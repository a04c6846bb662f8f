"""JSON schema → Arrow type, for the typed `parsed` column of JSON-schema jobs.

Covers what structured generation produces for records: objects (structs),
arrays (lists), strings, integers, numbers, booleans, enums of one type and
nullable unions (``type: [string, "null"]``). Anything Parquet cannot hold as
one column type is refused with the schema path that causes it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from llm_batch.errors import JobSpecError

__all__ = ["arrow_type_for_schema", "coerce"]

_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


def arrow_type_for_schema(
    schema: dict[str, Any], path: str = "sampling.structured.json_schema"
) -> pa.DataType:
    if not isinstance(schema, dict):
        raise JobSpecError(f"{path}: expected a schema object")
    if "enum" in schema and "type" not in schema:
        kinds = {type(v) for v in schema["enum"]}
        if kinds == {str}:
            return pa.string()
        if kinds <= {int}:
            return pa.int64()
        raise JobSpecError(f"{path}.enum: values must all be strings or all integers")
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        if len(non_null) != 1:
            raise JobSpecError(
                f"{path}.type: one type (optionally with null) is needed, got {kind}"
            )
        kind = non_null[0]
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = schema.get("items")
        if not isinstance(items, dict):
            raise JobSpecError(f"{path}.items: an array needs an `items` schema")
        return pa.list_(arrow_type_for_schema(items, f"{path}.items"))
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            raise JobSpecError(f"{path}.properties: an object needs named `properties`")
        return pa.struct(
            [(k, arrow_type_for_schema(v, f"{path}.properties.{k}")) for k, v in props.items()]
        )
    raise JobSpecError(f"{path}.type: {kind!r} cannot become a Parquet column type")


def coerce(value: Any, type_: pa.DataType) -> Any:
    """Shape a parsed JSON value for ``pa.array(type=type_)``; raises ValueError if it cannot."""
    if value is None:
        return None
    if pa.types.is_struct(type_):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        return {f.name: coerce(value.get(f.name), f.type) for f in type_}
    if pa.types.is_list(type_):
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {type(value).__name__}")
        return [coerce(v, type_.value_type) for v in value]
    if pa.types.is_integer(type_):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if pa.types.is_floating(type_):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if pa.types.is_boolean(type_):
        if not isinstance(value, bool):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value
