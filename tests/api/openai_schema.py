"""Validate response bodies against OpenAI's own schemas (extracted into openai_schemas.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_FILE = Path(__file__).with_name("openai_schemas.json")


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return document


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for `components/schemas/<name>`; `$ref`s resolve inside the same file."""
    document = _document()
    if name not in document["components"]["schemas"]:
        raise KeyError(f"{name} is not in {SCHEMA_FILE.name}; add it to the extract script")
    schema = {**document, "$ref": f"#/components/schemas/{name}"}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(body: Any, name: str) -> list[str]:
    """Every way `body` breaks schema `name`, as `path: message` lines (empty when valid)."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator(name).iter_errors(body)
    ]


def assert_matches(body: Any, name: str) -> None:
    errors = schema_errors(body, name)
    assert not errors, f"response does not match OpenAI's {name}:\n" + "\n".join(errors)
