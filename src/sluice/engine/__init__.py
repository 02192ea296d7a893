"""Engines behind the narrow `Engine` protocol (engine/protocol.py): vLLM's `AsyncLLM` with its
engine core, or the same front end over the synthetic core."""

from sluice.engine.protocol import (
    REQUEST_OBSERVER,
    Engine,
    EngineFailure,
    EngineStats,
    RequestObserver,
    Submission,
)

__all__ = [
    "REQUEST_OBSERVER",
    "Engine",
    "EngineFailure",
    "EngineStats",
    "RequestObserver",
    "Submission",
]
