"""`Serving`: vLLM's own OpenAI serving objects, built in this process on the engine's client.

`vllm serve` builds its serving classes in `init_app_state` (vllm/entrypoints/launchers/
api_server/app_state.py) from the engine client and its argument namespace; sluice calls the
same function on the same inputs, into a state object of its own, and its routes call these
objects (as Ray Serve LLM and KServe embed vLLM). So every request field, chat template,
tool and reasoning parser, LoRA adapter and response shape is vLLM's, and sluice's routes
only put the gateway around them. What it costs and pins: docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import State

from sluice.engine.protocol import Engine
from sluice.errors import NotSupported


class Serving:
    """Typed access to the serving objects of one engine; `None` until `build` ran."""

    def __init__(self, state: State, supported_tasks: tuple[str, ...]) -> None:
        self._state = state
        self.supported_tasks = supported_tasks

    @classmethod
    async def build(cls, engine: Engine) -> Serving:
        """vLLM's serving objects for `engine` (which must be ready)."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        client = engine.client
        supported_tasks = tuple(await client.get_supported_tasks())
        state = State()
        await init_app_state(client, state, engine.args, supported_tasks)
        return cls(state, supported_tasks)

    def _get(self, name: str, what: str) -> Any:
        handler = getattr(self._state, name, None)
        if handler is None:
            raise NotSupported(f"The loaded model does not support {what}.")
        return handler

    @property
    def chat(self) -> Any:
        """`OpenAIServingChat`."""
        return self._get("openai_serving_chat", "the Chat Completions API")

    @property
    def completion(self) -> Any:
        """`OpenAIServingCompletion`."""
        return self._get("openai_serving_completion", "the Completions API")

    @property
    def responses(self) -> Any:
        """`OpenAIServingResponses`."""
        return self._get("openai_serving_responses", "the Responses API")

    @property
    def embedding(self) -> Any:
        """`ServingEmbedding` (pooling models)."""
        return self._get("serving_embedding", "the Embeddings API")

    @property
    def tokenization(self) -> Any:
        """`ServingTokenization`."""
        return self._get("serving_tokenization", "tokenization")

    @property
    def models(self) -> Any:
        """`OpenAIServingModels`: base model names and LoRA adapters."""
        return self._get("openai_serving_models", "model listing")
