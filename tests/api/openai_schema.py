"""Validate response bodies against OpenAI's own schemas (extracted into openai_schemas.json).

vLLM's serving layer writes `null` for optional fields it does not fill (`annotations`,
`function_call`, `prompt_tokens_details`, ...) where OpenAI's schema leaves them out; sluice
serves vLLM's bodies as they are (docs/architecture.md, "Deviations"). `assert_matches`
therefore accepts a `null` wherever the schema wants some other type, and nothing else.
"""

from __future__ import annotations

import copy
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


def _without_vllm_nulls(body: Any, name: str) -> Any:
    """`body` without the `null`s the schema refuses only for their type."""
    body = copy.deepcopy(body)
    while True:
        nulls = [
            list(error.absolute_path)
            for error in validator(name).iter_errors(body)
            if error.instance is None and error.validator == "type" and error.absolute_path
        ]
        if not nulls:
            return body
        for path in nulls:
            parent = body
            for part in path[:-1]:
                parent = parent[part]
            parent.pop(path[-1], None)


def schema_errors(body: Any, name: str) -> list[str]:
    """Every way `body` breaks schema `name`, as `path: message` lines (empty when valid)."""
    body = _without_vllm_nulls(body, name)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator(name).iter_errors(body)
    ]


def assert_matches(body: Any, name: str) -> None:
    errors = schema_errors(body, name)
    assert not errors, f"response does not match OpenAI's {name}:\n" + "\n".join(errors)
