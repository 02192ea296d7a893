"""Log format choice, vLLM's logging config, and the demotion of advice nobody can act on."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
from pathlib import Path

import pytest

from sluice.telemetry import logging as sluice_logging
from sluice.telemetry.logging import AdviceFilter, JsonFormatter, resolved_format


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_on_a_terminal_json_otherwise_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", Tty())
    assert resolved_format(None) == "text"
    assert resolved_format("json") == "json"
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert resolved_format(None) == "json"
    assert resolved_format("text") == "text"


def test_vllm_cpu_advice_is_info_other_warnings_stay() -> None:
    advice = logging.makeLogRecord(
        {
            "msg": "%s is not found in LD_PRELOAD. For best performance, ...",
            "args": ("libiomp",),
            "levelno": logging.WARNING,
            "levelname": "WARNING",
        }
    )
    real = logging.makeLogRecord(
        {"msg": "KV cache is almost full", "levelno": logging.WARNING, "levelname": "WARNING"}
    )
    assert AdviceFilter().filter(advice) and AdviceFilter().filter(real)
    assert (advice.levelname, real.levelname) == ("INFO", "WARNING")


def test_vllm_gets_sluices_formatter_in_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("VLLM_LOGGING_CONFIG_PATH", "TQDM_DISABLE", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS")
    for name in (*names, "SLUICE_SERVER_PID"):
        monkeypatch.setenv(name, "x")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    sluice_logging._configure_vllm("info", "json")
    assert os.environ["SLUICE_SERVER_PID"] == str(os.getpid())
    monkeypatch.setenv("SLUICE_SERVER_PID", "1")  # as seen from one of vLLM's processes
    path = Path(os.environ["VLLM_LOGGING_CONFIG_PATH"])
    config = json.loads(path.read_text())
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    stream = io.StringIO()
    config["handlers"]["sluice"]["stream"] = stream
    logging.config.dictConfig(config)  # as vLLM applies it (vllm/logger.py)
    try:
        logging.getLogger("vllm.v1.worker.cpu_worker").warning(
            "%s is not found in LD_PRELOAD.", "libtcmalloc"
        )
    finally:
        logging.getLogger("vllm").handlers.clear()
        path.unlink()
    line = json.loads(stream.getvalue())
    assert line["level"] == "info" and line["logger"] == "vllm.v1.worker.cpu_worker"
    assert line["pid"] == os.getpid()  # not the server's pid: a child's line says whose


def test_json_lines_leave_out_uvicorns_colored_copy() -> None:
    record = logging.makeLogRecord({"msg": "up", "color_message": "\x1b[1mup\x1b[0m"})
    assert "color_message" not in json.loads(JsonFormatter().format(record))
