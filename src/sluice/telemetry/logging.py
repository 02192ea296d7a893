"""Logs: one stream on stderr, JSON lines or text, and the one line written per request.

With `json` every log record becomes one JSON object (`ts`, `level`, `logger`, `msg`, plus
any `extra` fields); `text` is a line for people. Unset, it is text on a terminal and JSON
otherwise (a container, a file, a log shipper). vLLM's own records, in this process and in
its engine-core and worker processes, go through the same formatter (a logging config
handed to vLLM by `VLLM_LOGGING_CONFIG_PATH`, which vLLM applies in every process), with
their process name (`vllm_process_name`). What the user of a packaged server cannot act on
is quieted: vLLM's CPU tuning advice (LD_PRELOAD allocators, Triton, the eager mode sluice
chose) is logged at info rather than as warnings, progress bars are off in JSON, and
torch's C++ notes and Python's deprecation warnings are not printed. Each is only a default:
a variable the user has set wins.

The request line (`logger: sluice.request`) carries the request id, model, key, tokens, their
USD cost (the price table), TTFT, latency, status and, for a refusal, its reason. Prompts and
outputs are logged only with `telemetry.log_prompts`, and then redacted
(telemetry/redaction.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sluice.telemetry.record import RequestRecord
from sluice.telemetry.redaction import redact

REQUEST_LOGGER = "sluice.request"
# Record attributes that are not fields of the line: the standard ones, uvicorn's colored
# copy of the message, and vLLM's process name (kept only when it is not the main process).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


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
        if line.get("vllm_process_name") == "MainProcess":
            del line["vllm_process_name"]
        if str(record.process) != os.environ.get(SERVER_PID, str(record.process)):
            line["pid"] = record.process  # a line from one of vLLM's child processes
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SERVER_PID = "SLUICE_SERVER_PID"  # set by the server, inherited by vLLM's processes
# vLLM warnings about its environment that a packaged server's user cannot act on, by the
# start of their message: logged at info instead (AdviceFilter).
ADVICE = (
    "libtcmalloc is not found in LD_PRELOAD",
    "libiomp is not found in LD_PRELOAD",
    "Triton is not installed",
    "Triton is installed, but doesn't include CPU backend",
    "Model Runner V2 requires Triton",
    "Enforce eager set",
    "Inductor compilation was disabled",
    "Reset SSM cache type",
)
# Set for vLLM and its child processes unless the user set them.
QUIET_ENV = {
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ notes (NUMA binding) bypass logging
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with vLLM's process name when the record comes from its processes."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if str(record.process) != os.environ.get(SERVER_PID, str(record.process)):
            return f"(pid {record.process}) {line}"
        return line


class AdviceFilter(logging.Filter):
    """Log vLLM's environment advice (`ADVICE`) at info rather than as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith(ADVICE):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def resolved_format(fmt: str | None) -> str:
    """`fmt`, or when unset: text on a terminal, JSON otherwise."""
    if fmt is not None:
        return fmt
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str, fmt: str | None) -> None:
    """Route all logging (sluice, uvicorn, vLLM in every process) through one stderr format
    (module docstring)."""
    fmt = resolved_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(AdviceFilter())
    _configure_vllm(level, fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # One line per request comes from sluice; uvicorn's access log would be a second. A
    # later `logging.config.dictConfig(..., disable_existing_loggers=False)` (vLLM's
    # configuration runs one) enables every logger again, so server.py also turns the
    # access log off in uvicorn's own config.
    logging.getLogger("uvicorn.access").disabled = True


def _configure_vllm(level: str, fmt: str) -> None:
    """Hand vLLM a logging config with sluice's formatter, for every process it starts."""
    os.environ[SERVER_PID] = str(os.getpid())
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if fmt == "json":
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are not log lines
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return
    formatter = "JsonFormatter" if fmt == "json" else "TextFormatter"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": f"{__name__}.{formatter}"}},
        "filters": {"advice": {"()": f"{__name__}.AdviceFilter"}},
        "handlers": {
            "sluice": {
                "class": "logging.StreamHandler",
                "formatter": "sluice",
                "filters": ["advice"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {"vllm": {"handlers": ["sluice"], "level": level.upper(), "propagate": False}},
    }
    handle, name = tempfile.mkstemp(prefix="sluice-vllm-logging-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        json.dump(config, out)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = name
    atexit.register(_remove, Path(name))


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


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
            "backend": record.backend,
            "attempt": record.attempt,
            "key": record.key_name,
            "status": record.status,
            "reason": record.error_code,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cost_usd": record.cost_usd,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "latency_ms": round((finished_at - record.started) * 1000, 1),
        },
    )
