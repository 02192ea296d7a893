"""A fake engine for API tests: vLLM's real front end over a scripted synthetic core.

Everything above the engine core is real (the default model's tokenizer and chat template,
vLLM's request validation, output processor and OpenAI serving layer); the core emits
scripted text (default: filler words) as fast as asked, records what it was given (requests,
aborts), can hold requests in a queue, die mid-generation or be slow to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sluice.config import DEFAULT_MODEL_NAME, default_cache_dir
from sluice.engine.args import engine_namespace
from sluice.engine.models import default_model_dir
from sluice.engine.synthetic import SyntheticCore, SyntheticEngine, SyntheticSequence

MODEL_ID = "fake-model"
Script = Callable[[Any], str | None]  # an EngineCoreRequest -> the text to answer, or filler


# Read at import, before tests point SLUICE_CACHE_DIR at temporary folders.
MODEL_FOLDER = default_model_dir(default_cache_dir())


def model_folder() -> str:
    """The default model's folder (its tokenizer and config; `sluice model pull` made it)."""
    folder = MODEL_FOLDER
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"{DEFAULT_MODEL_NAME} is not pulled: run `sluice model pull`")
    return str(folder)


class ScriptedCore(SyntheticCore):
    """A synthetic core that answers scripts, records requests and can fail."""

    def __init__(
        self,
        tokens_per_s: float = 5000.0,
        max_num_seqs: int | None = None,
        script: Script | None = None,
        fail_after_tokens: int | None = None,
    ) -> None:
        super().__init__(tokens_per_s, max_num_seqs)
        self.script = script
        self.fail_after_tokens = fail_after_tokens
        self.tokenizer: Any = None
        self.masked_alternatives = False
        self.requests: list[Any] = []
        self.aborted: list[str] = []
        self.emitted = 0
        self._scripted: dict[str, list[int]] = {}

    async def add_request_async(self, request: Any) -> None:
        self.requests.append(request)
        await super().add_request_async(request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)
        await super().abort_requests_async(request_ids)

    @property
    def active(self) -> set[str]:
        return set(self.running) | set(self.waiting)

    def next_token(self, sequence: SyntheticSequence) -> int:
        request = sequence.request
        if request.request_id not in self._scripted:
            text = self.script(request) if self.script is not None else None
            self._scripted[request.request_id] = (
                [] if text is None else self.tokenizer.encode(text, add_special_tokens=False)
            )
        ids = self._scripted[request.request_id]
        if not ids:  # filler from the first word, whatever the prompt: " one two three ..."
            return self.filler_ids[sequence.made % len(self.filler_ids)]
        if sequence.made < len(ids):
            return int(ids[sequence.made])
        return int(self.tokenizer.eos_token_id)

    def step(self, sequence: SyntheticSequence, output_type: Any) -> Any:
        if self.fail_after_tokens is not None and self.emitted >= self.fail_after_tokens:
            from vllm.v1.engine.exceptions import EngineDeadError

            self.resources.engine_dead = True
            raise EngineDeadError()
        self.emitted += 1
        output = super().step(sequence, output_type)
        if self.masked_alternatives and output.new_logprobs is not None:
            # what a grammar mask leaves the alternatives: -inf (and a NaN for good measure)
            logprobs = output.new_logprobs.logprobs
            logprobs[:, 1:] = float("-inf")
            if logprobs.shape[1] > 2:
                logprobs[:, 2] = float("nan")
        return output


class FakeEngine(SyntheticEngine):
    """`SyntheticEngine` with a `ScriptedCore`, served as `fake-model`."""

    def __init__(
        self,
        core: ScriptedCore | None = None,
        *,
        token_delay_s: float | None = None,
        max_running: int | None = None,
        fail_after_tokens: int | None = None,
        script: Script | None = None,
        cli_args: tuple[str, ...] = ("--max-model-len", "512"),
        start_delay_s: float = 0.0,
        start_error: Exception | None = None,
    ) -> None:
        args = engine_namespace(model_folder(), served_model_names=[MODEL_ID], cli_args=cli_args)
        self.core: ScriptedCore = core or ScriptedCore(
            tokens_per_s=1 / token_delay_s if token_delay_s else 5000.0,
            max_num_seqs=max_running,
            script=script,
            fail_after_tokens=fail_after_tokens,
        )
        super().__init__(args, self.core.step_s and 1 / self.core.step_s, core=self.core)
        self.start_delay_s = start_delay_s
        self.start_error = start_error

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.start_error is not None:
            raise self.start_error
        await super().start()
        self.core.tokenizer = self.client.renderer.get_tokenizer()

    @property
    def requests(self) -> list[Any]:
        """The `EngineCoreRequest`s the core was given, in order."""
        return self.core.requests

    @property
    def aborted(self) -> list[str]:
        """The request ids the core was told to abort, in order."""
        return self.core.aborted

    def kill(self) -> None:
        """The engine core dies (health checks fail from now on)."""
        self.core.resources.engine_dead = True
