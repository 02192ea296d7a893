"""`ObservedAsyncLLM`: vLLM's `AsyncLLM` with every engine request reported to the gateway.

vLLM's OpenAI serving layer calls `generate` (or `encode` for pooling models) once per engine
request. Inside an HTTP request the gateway has set `REQUEST_OBSERVER` (engine/protocol.py);
then this class:

1. reports the request when it is created (`submitted`: the exact prompt tokens the engine
   will see, `max_tokens`, `n`), lowers `max_tokens` and sets the priority as the observer
   answers;
2. awaits `before_engine` (the gateway's reservation) before vLLM sees the request;
3. reports `accepted` from `add_request`, once vLLM validated the request and queued it;
4. streams outputs in vLLM's DELTA mode whatever the caller asked, reporting new tokens as
   they arrive (so first-token time, inter-token gaps and metering work for non-streamed
   requests too), and hands a FINAL_ONLY caller one aggregated output at the end, as vLLM
   would have. A streamed request, the hot path, runs `AsyncLLM.generate`'s own loop with
   the meter inline (`_streamed`): one generator per output, not two;
5. runs `n > 1` with greedy sampling (temperature 0) as `n` single greedy requests merged
   back into one stream: OpenAI accepts it and the choices are equal, vLLM refuses it
   (`SamplingParams._verify_greedy_sampling`). The request models in api/requests.py let
   such params through for this purpose.

Without an observer (vLLM's own warm-up, LoRA loading, tests) every call goes straight to
`AsyncLLM`. This module imports vLLM; import it only where vLLM is wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
from vllm.outputs import STREAM_FINISHED, RequestOutput
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from sluice.engine.protocol import REQUEST_OBSERVER, RequestObserver, Submission

# vLLM's own threshold for greedy sampling (vllm/sampling_params.py: _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


class ObservedAsyncLLM(AsyncLLM):  # type: ignore[misc]  # vLLM is untyped here
    """`AsyncLLM` whose `generate`/`encode` report to the current request's observer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._shut_down = False
        super().__init__(*args, **kwargs)
        # engine request id -> (observer, the submission's request id), until accepted
        self._awaiting_acceptance: dict[str, tuple[RequestObserver, str]] = {}

    def shutdown(self, timeout: float | None = None) -> None:
        """vLLM's shutdown, once: `AsyncLLM.__del__` calls it again, and when that happens
        at interpreter exit (the serving objects keep the engine alive until then) it fails
        with a traceback in the log of a clean stop."""
        if self._shut_down:
            return
        self._shut_down = True
        super().shutdown(timeout)

    def __del__(self) -> None:
        if not getattr(self, "_shut_down", True):
            with contextlib.suppress(Exception):
                self.shutdown()

    def generate(  # returns the generator at once, so the submission is seen before any await
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        observer = REQUEST_OBSERVER.get()
        if observer is None:
            unobserved: AsyncGenerator[Any, None] = super().generate(
                prompt, sampling_params, request_id, **kwargs
            )
            return unobserved
        prompt_tokens = extract_prompt_len(self.model_config, prompt)
        max_tokens = sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = self.model_config.max_model_len - prompt_tokens
        submission = Submission(
            request_id,
            prompt_tokens,
            max_tokens,
            sampling_params.n,
            sampling_params.temperature,
            sampling_params.top_p,
        )
        lowered, kwargs["priority"] = observer.submitted(submission, kwargs.get("priority", 0))
        if lowered is not None and lowered < max_tokens:
            sampling_params.max_tokens = lowered
        fan_out = sampling_params.n > 1 and sampling_params.temperature < GREEDY_TEMPERATURE
        if fan_out or sampling_params.output_kind == RequestOutputKind.FINAL_ONLY:
            return self._observed(observer, prompt, sampling_params, request_id, kwargs)
        return self._streamed(observer, prompt, sampling_params, request_id, kwargs)

    def encode(
        self, prompt: Any, pooling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        observer = REQUEST_OBSERVER.get()
        if observer is None:
            unobserved: AsyncGenerator[Any, None] = super().encode(
                prompt, pooling_params, request_id, **kwargs
            )
            return unobserved
        submission = Submission(request_id, extract_prompt_len(self.model_config, prompt), 0, 1)
        _, kwargs["priority"] = observer.submitted(submission, kwargs.get("priority", 0))
        return self._observed_pooling(observer, prompt, pooling_params, request_id, kwargs)

    async def add_request(self, request_id: str, *args: Any, **kwargs: Any) -> Any:
        """vLLM's `add_request`, and `accepted` to the observer. A number the engine's wire
        format cannot carry (msgspec encodes integers in 64 bits: a `top_k` of 1e30, a
        JSON schema's `maximum` of 10**23) is the request's fault: a 400
        (`VLLMValidationError`) and the request, already registered with the output
        processor, aborted (vLLM raises `OverflowError` there and leaves it behind)."""
        try:
            collector = await super().add_request(request_id, *args, **kwargs)
        except OverflowError as exc:
            await self.abort(request_id)  # the external id: vLLM gave it an internal one
            raise VLLMValidationError(
                "A number in the request is out of range: the engine takes integers from "
                f"-2**63 to 2**64-1 ({exc})."
            ) from exc
        waiting = self._awaiting_acceptance.pop(request_id, None)
        if waiting is not None:
            observer, submission_id = waiting
            observer.accepted(submission_id)
        return collector

    async def _observed(
        self,
        observer: RequestObserver,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[RequestOutput, None]:
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
        params.output_kind = RequestOutputKind.DELTA
        if params.n > 1 and params.temperature < GREEDY_TEMPERATURE:
            stream = self._fanned_out(observer, prompt, params, request_id, kwargs)
        else:
            self._awaiting_acceptance[request_id] = (observer, request_id)
            stream = super().generate(prompt, params, request_id, **kwargs)
        aggregate: RequestOutput | None = None
        first = True
        try:
            await observer.before_engine()
            async for output in stream:
                observer.on_output(
                    output,
                    sum(len(choice.token_ids) for choice in output.outputs),
                    _queue_seconds(output) if first else None,
                )
                first = False
                if not final_only:
                    yield output
                elif aggregate is None:
                    aggregate = output
                else:
                    aggregate.add(output, aggregate=True)
            if aggregate is not None:
                yield aggregate
        except Exception as exc:
            observer.failed(exc)
            raise
        finally:
            await stream.aclose()
            self._awaiting_acceptance.pop(request_id, None)
            observer.finished(request_id)

    async def _streamed(
        self,
        observer: RequestObserver,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[RequestOutput, None]:
        """The hot path (a stream of deltas): `AsyncLLM.generate`'s own loop
        (vllm/v1/engine/async_llm.py, 0.32) with the observer inline, so that each streamed
        output passes one generator, not two."""
        collector = None
        first = True
        try:
            await observer.before_engine()
            self._awaiting_acceptance[request_id] = (observer, request_id)
            collector = await self.add_request(request_id, prompt, params, **kwargs)
            finished = False
            while not finished:
                # take what is there without awaiting (no task switch under load), as vLLM
                output = collector.get_nowait() or await collector.get()
                finished = output.finished
                if output is STREAM_FINISHED:
                    continue
                observer.on_output(
                    output,
                    sum(len(choice.token_ids) for choice in output.outputs),
                    _queue_seconds(output) if first else None,
                )
                first = False
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            if collector is not None:
                await self.abort(collector.request_id, internal=True)
            raise
        except (EngineDeadError, VLLMClientError, GracefulHTTPError) as exc:
            observer.failed(exc)
            raise
        except Exception as exc:
            observer.failed(exc)
            if collector is not None:
                await self.abort(collector.request_id, internal=True)
                raise EngineGenerateError() from exc
            raise
        finally:
            if collector is not None:
                collector.close()
            self._awaiting_acceptance.pop(request_id, None)
            observer.finished(request_id)

    async def _fanned_out(
        self,
        observer: RequestObserver,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[RequestOutput, None]:
        """`n` greedy requests of one choice each, merged into one stream of `n` choices."""
        single = params.clone()
        single.n = 1
        streams = []
        for index in range(params.n):
            sub_id = f"{request_id}-{index}"
            self._awaiting_acceptance[sub_id] = (observer, request_id)
            streams.append(
                _reindexed(super().generate(prompt, single, sub_id, **kwargs), index, request_id)
            )
        remaining = params.n
        try:
            async for output in _merged(streams):
                if output.finished:
                    remaining -= 1
                output.finished = remaining == 0
                yield output
        finally:
            for index in range(params.n):
                self._awaiting_acceptance.pop(f"{request_id}-{index}", None)

    async def _observed_pooling(
        self,
        observer: RequestObserver,
        prompt: Any,
        params: Any,
        request_id: str,
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        self._awaiting_acceptance[request_id] = (observer, request_id)
        stream = super().encode(prompt, params, request_id, **kwargs)
        try:
            await observer.before_engine()
            async for output in stream:
                observer.on_output(output, 0, None)
                yield output
        except Exception as exc:
            observer.failed(exc)
            raise
        finally:
            await stream.aclose()
            self._awaiting_acceptance.pop(request_id, None)
            observer.finished(request_id)


def _queue_seconds(output: Any) -> float | None:
    """Engine-core queue time of a request, once it has been scheduled."""
    stats = getattr(output, "metrics", None)
    if stats is None or not stats.scheduled_ts or not stats.queued_ts:
        return None
    return max(0.0, float(stats.scheduled_ts - stats.queued_ts))


async def _reindexed(
    stream: AsyncGenerator[RequestOutput, None], index: int, request_id: str
) -> AsyncGenerator[RequestOutput, None]:
    try:
        async for output in stream:
            output.request_id = request_id
            for choice in output.outputs:
                choice.index = index
            yield output
    finally:
        await stream.aclose()


async def _merged(streams: list[AsyncGenerator[RequestOutput, None]]) -> AsyncIterator[Any]:
    """Interleave several output streams as their items arrive; the first error wins."""
    queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
