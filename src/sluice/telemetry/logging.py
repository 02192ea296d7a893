"""Logs: JSON lines on stderr, and the one line written per request.

Every log record becomes one JSON object (`ts`, `level`, `logger`, `msg`, plus any `extra`
fields). The request line (`logger: sluice.request`) carries the request id, model, tokens,
TTFT, latency, status and, for a refusal, its reason. Prompts and outputs are logged only
with `telemetry.log_prompts`, and then redacted (telemetry/redaction.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from sluice.telemetry.record import RequestRecord
from sluice.telemetry.redaction import redact

REQUEST_LOGGER = "sluice.request"
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra={...}` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Route all logging (sluice, uvicorn, vLLM's frontend) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # One line per request comes from sluice; uvicorn's access log would be a second.
    logging.getLogger("uvicorn.access").disabled = True


def log_request(record: RequestRecord, finished_at: float) -> None:
    """The one log line of a finished request."""
    ttft = record.ttft_s
    extra: dict[str, Any] = {}
    if record.prompt_text is not None:
        extra["prompt"] = redact(record.prompt_text)
    if record.output_text is not None:
        extra["output"] = redact("".join(record.output_text))
    logging.getLogger(REQUEST_LOGGER).info(
        "request",
        extra={
            **extra,
            "request_id": record.request_id,
            "trace_id": record.trace_id,
            "endpoint": record.endpoint,
            "model": record.model,
            "key": record.key_name,
            "status": record.status,
            "reason": record.error_code,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "latency_ms": round((finished_at - record.started) * 1000, 1),
        },
    )
