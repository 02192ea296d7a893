"""`Generation`: what every generating route does around its call into vLLM's serving layer.

In order: the key (a dependency, so 401/403 come before the body is looked at), the body's
fields (unknown ones refused), the key's model allowlist and the `max_tokens`/`n` caps, then
an `Exchange` (lifecycle slot and admission), then vLLM's serving call with the exchange as
the observer of every engine request it starts, under the request's time limit and with the
client's disconnect cancelling it. What vLLM returns becomes the response: a stream
(`SSEResponse`, which closes the exchange when it ends), a body (the exchange closes first),
or an error in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from opentelemetry import trace
from pydantic import BaseModel
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from sluice.api.deps import (
    GatewayDep,
    LifecycleDep,
    PrincipalDep,
    ServingDep,
    SettingsDep,
    TracerDep,
)
from sluice.api.exchange import Exchange
from sluice.api.requests import check_fields
from sluice.api.serving import Serving
from sluice.api.sse import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    SSEResponse,
    until_disconnected,
)
from sluice.config import Settings
from sluice.engine.protocol import REQUEST_OBSERVER
from sluice.errors import from_exception, from_vllm
from sluice.gateway.auth import Principal
from sluice.gateway.guards import check_allowed, check_max_tokens, check_n
from sluice.gateway.service import Gateway
from sluice.lifecycle import Lifecycle
from sluice.telemetry.record import record_of


@dataclass(frozen=True)
class Shape:
    """What the gateway checks of a body: its `max_tokens` under the endpoint's name for it,
    its `n`, and how many prompts it carries."""

    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    n: int | None = None
    prompts: int = 1


def prompt_count(prompt: Any) -> int:
    """Prompts in a completions `prompt` or embeddings `input`: a string or a list of token
    ids is one; a list of strings or of token-id lists is one each."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


@dataclass(frozen=True)
class Generation:
    """Everything a generating route needs, resolved once (the key before the body)."""

    request: Request
    principal: Principal
    settings: Settings
    serving: Serving
    lifecycle: Lifecycle
    gateway: Gateway
    tracer: trace.Tracer

    def serves(self, model: str) -> bool:
        """`model` is one of the base model's names or a loaded LoRA adapter."""
        models = self.serving.models
        return bool(models.is_base_model(model)) or model in models.lora_requests

    def model_of(self, body: BaseModel) -> str:
        """The model id the request names, or the served model's first name."""
        model: str | None = getattr(body, "model", None)
        return model or self.serving.models.base_model_paths[0].name

    async def serve(
        self,
        body: BaseModel,
        operation: str,
        call: Callable[[], Awaitable[Any]],
        shape: Shape = Shape(),
    ) -> Response:
        """Check `body`, open the exchange, run `call` (vLLM's serving method) and turn what
        it returns into the response (module docstring)."""
        check_fields(body)
        model = self.model_of(body)
        check_allowed(model, self.principal)
        limits = self.settings.limits
        check_max_tokens(shape.max_tokens, shape.max_tokens_param, self.principal, limits)
        check_n(shape.n, shape.prompts, limits)
        record = record_of(self.request.scope)
        if record is not None and self.serves(model):
            record.model = model  # a metric label: only ids this server serves (bounded)
        exchange = Exchange.open(
            principal=self.principal,
            gateway=self.gateway,
            lifecycle=self.lifecycle,
            limits=limits,
            model=model,
            operation=operation,
            engine_client=self.serving.models.engine_client,
            requested_max_tokens=shape.max_tokens,
            record=record,
            tracer=self.tracer,
        )
        if record is not None and self.settings.telemetry.log_prompts:
            record.prompt_text = _prompt_text(body)
            record.output_text = []
        REQUEST_OBSERVER.set(exchange)
        try:
            outcome, result = await _run(self.request, call, exchange.deadline)
        except Exception as exc:
            await exchange.close(exc)
            raise exchange.error or from_exception(exc) from exc
        if outcome == "timeout":
            error = exchange.timed_out()
            await exchange.close(error)
            raise error
        if outcome == "disconnected":
            if record is not None:
                record.fail(CLIENT_CLOSED_REQUEST, "client_closed_request")
            await exchange.close(ClientDisconnected())
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(result, ErrorResponse) or exchange.error is not None:
            await exchange.close()
            raise exchange.error or from_vllm(
                result.error.code, result.error.message, result.error.param
            )
        if hasattr(result, "__anext__"):
            keep_alive = float(getattr(self.serving_args, "sse_keep_alive_interval", 0) or 0)
            return SSEResponse(result, exchange, keep_alive)
        await exchange.close()
        if isinstance(result, Response):
            result.headers.update(exchange.headers)
            return result
        return Response(
            result.model_dump_json(), media_type="application/json", headers=exchange.headers
        )

    @property
    def serving_args(self) -> Any:
        return self.request.app.state.engine.args


async def _generation(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    gateway: GatewayDep,
    tracer: TracerDep,
) -> Generation:
    # a coroutine, not the class itself: FastAPI would run a class in a worker thread
    return Generation(request, principal, settings, serving, lifecycle, gateway, tracer)


GenerationDep = Annotated[Generation, Depends(_generation)]


async def _run(
    request: Request, call: Callable[[], Awaitable[Any]], deadline: float
) -> tuple[str, Any]:
    """Run `call` until it returns (`("done", result)`), the deadline passes (`"timeout"`) or
    the client disconnects (`"disconnected"`); the latter two cancel it."""
    work = asyncio.ensure_future(call())
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    outcome = "timeout"
    try:
        done, _ = await asyncio.wait(
            {work, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if work in done:
            outcome = "done"
        elif watch in done:
            outcome = "disconnected"
    finally:
        watch.cancel()
        if not work.done():
            # vLLM's non-streaming generators turn cancellation into an error response.
            work.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await work
    return outcome, work.result() if outcome == "done" else None


def _prompt_text(body: BaseModel) -> str:
    """The prompt part of a body, for log lines (redacted where they are written): chat
    messages as `role: text` lines, prompts as they came (token ids as JSON)."""
    messages = getattr(body, "messages", None)
    if isinstance(messages, list):
        return "\n".join(f"{m.get('role')}: {_text(m.get('content'))}" for m in messages)
    for field in ("prompt", "input"):
        value = getattr(body, field, None)
        if isinstance(value, str):
            return value
        if value is not None:
            return json.dumps(value, default=str)
    return ""


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)
