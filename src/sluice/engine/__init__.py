"""Engines behind the narrow `Engine` protocol (engine/protocol.py)."""

from sluice.engine.protocol import (
    Delta,
    Engine,
    EngineFailure,
    EngineStats,
    GenerationRequest,
    ModelCard,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineFailure",
    "EngineStats",
    "GenerationRequest",
    "ModelCard",
    "SamplingOptions",
    "StructuredOutput",
    "TokenLogprob",
]
