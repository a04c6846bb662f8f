"""JSON schema → Arrow types for the typed `parsed` column."""

from __future__ import annotations

import pyarrow as pa
import pytest

from llm_batch.errors import JobSpecError
from llm_batch.job.jsonschema import arrow_type_for_schema, coerce


def test_record_schema_becomes_a_struct():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": ["integer", "null"]},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
            "addr": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    t = arrow_type_for_schema(schema)
    assert t == pa.struct(
        [
            ("name", pa.string()),
            ("age", pa.int64()),
            ("score", pa.float64()),
            ("ok", pa.bool_()),
            ("tags", pa.list_(pa.string())),
            ("addr", pa.struct([("city", pa.string())])),
        ]
    )
    value = coerce(
        {"name": "x", "age": None, "score": 1, "ok": True, "tags": ["a"], "addr": {"city": "y"}}, t
    )
    assert pa.array([value], t).to_pylist() == [{**value, "score": 1.0}]


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "object"}, "sampling.structured.json_schema.properties"),
        ({"type": "array"}, "sampling.structured.json_schema.items"),
        ({"type": ["string", "integer"]}, "one type"),
        (
            {"type": "object", "properties": {"x": {"type": "tuple"}}},
            "sampling.structured.json_schema.properties.x.type",
        ),
        ({"enum": ["a", 1]}, "enum"),
    ],
)
def test_unsupported_schemas_name_the_path(schema, needle):
    with pytest.raises(JobSpecError, match=needle.replace(".", r"\.")):
        arrow_type_for_schema(schema)


def test_coerce_refuses_wrong_shapes():
    t = pa.struct([("n", pa.int64())])
    with pytest.raises(ValueError, match="expected an integer"):
        coerce({"n": "1"}, t)
    with pytest.raises(ValueError, match="expected an object"):
        coerce([1], t)
