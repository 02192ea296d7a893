"""`Generation`: what every generating route does around its call into vLLM's serving layer
or an upstream backend.

`dispatch` reads the body's `model` first: a name the in-process engine serves (or one the
routing knows nothing of) goes to the route's local handler, which parses the body with
vLLM's request model and calls `serve`; an upstream model or an alias of one goes to
`UpstreamCall` (backends/proxy.py) with the body as the client sent it. A fallback chain may
cross from one to the other: an engine that is loading or overloaded hands the request to
the next model of the chain, and a chain of upstreams that reaches an engine model hands it
back.

`serve`, in order: the key (a dependency, so 401/403 come before the body is looked at), the body's
fields (unknown ones refused), the key's model allowlist and the `max_tokens`/`n` caps, then
an `Exchange` (lifecycle slot and admission), then vLLM's serving call with the exchange as
the observer of every engine request it starts, under the request's time limit and with the
client's disconnect cancelling it. What vLLM returns becomes the response: a stream
(`SSEResponse`, which closes the exchange when it ends), a body (`OwnedResponse`, which
closes it once the body is sent), or an error in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from sluice.api.deps import (
    GatewayDep,
    LifecycleDep,
    PrincipalDep,
    SettingsDep,
    TracerDep,
    serving_of,
)
from sluice.api.exchange import Exchange
from sluice.api.middleware import response_headers
from sluice.api.requests import check_fields
from sluice.api.serving import Serving
from sluice.api.sse import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    OwnedResponse,
    SSEResponse,
    StreamOwner,
    until_disconnected,
)
from sluice.backends.proxy import (
    LocalHandoff,
    UpstreamCall,
    UpstreamRateLimited,
    estimate_prompt_tokens,
    static_message,
    static_response,
)
from sluice.backends.registry import LOCAL, Backends
from sluice.backends.router import as_stream, escalation, needed_tags
from sluice.config import Settings
from sluice.engine.protocol import REQUEST_OBSERVER
from sluice.errors import (
    CLIENT_PARAMS,
    Draining,
    EngineDead,
    InvalidRequest,
    ModelLoading,
    RequestTimedOut,
    ServiceUnavailable,
    SluiceError,
    from_exception,
    from_vllm,
    spec_for,
    validation_error,
)
from sluice.gateway.admission import Overloaded
from sluice.gateway.auth import Principal
from sluice.gateway.guards import check_allowed, check_max_tokens, check_n
from sluice.gateway.service import Gateway
from sluice.lifecycle import Lifecycle
from sluice.telemetry.metrics import Metrics
from sluice.telemetry.record import RequestRecord, record_of

logger = logging.getLogger(__name__)
# The engine could not take a request (not the server draining, not the limits store down):
# at a chain's end, the chain's static fallback message may answer.
ENGINE_DOWN = (ModelLoading, Overloaded, EngineDead)


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


# What each endpoint calls its output cap (OpenAI's names).
MAX_TOKENS_PARAMS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "text_completion": ("max_tokens",),
    "generate_content": ("max_output_tokens",),
    "embeddings": (),
}
# Output caps other OpenAI-compatible servers take beside OpenAI's, under their own names:
# llama.cpp's server reads `n_predict` before `max_tokens` (its
# `params_from_json_cmpl`), TGI's generate parameters say `max_new_tokens`. An upstream may
# honour them, so they are capped and reserved like `max_tokens`, never forwarded unread.
OTHER_MAX_TOKENS_PARAMS = ("n_predict", "max_new_tokens")


class UpstreamShape(BaseModel):
    """The fields of a body forwarded to an upstream that sluice itself reads (the rest
    goes as it came; the upstream judges it)."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    n_predict: int | None = Field(None, ge=1)  # llama.cpp's -1 (no limit) cannot be reserved
    max_new_tokens: int | None = Field(None, ge=1)
    logprobs: bool | int | None = None  # chat: a bool; completions: how many

    def prompts(self, operation: str) -> int:
        """Prompts a completions body carries (each gets `n` completions); one otherwise."""
        if operation != "text_completion":
            return 1
        return prompt_count((self.model_extra or {}).get("prompt"))

    def normalised(self, raw: dict[str, Any]) -> dict[str, Any]:
        """`raw` with the fields sluice read as it read them (`"stream": "false"` is a
        false `stream` for sluice, so it must be for the upstream too)."""
        body = dict(raw)
        for name in type(self).model_fields:
            if name in raw:
                body[name] = getattr(self, name)
        return body


# What an integer out of 64 bits looks like in a body: 19 digits or more (2**63 has 19).
LONG_INTEGER = re.compile(rb"\d{19}")
INT_RANGE = (-(2**63), 2**64 - 1)  # what any OpenAI-compatible server's fields take


def check_integers(body: Any) -> None:
    """Raise a 400 naming the field (`top_k`, `response_format.json_schema.schema.maximum`)
    for an integer anywhere in `body` outside `INT_RANGE`: no server takes one (vLLM's
    answers 500), so an upstream body with one is refused as the engine's path refuses it.
    Iterative: a body nested as deep as the parser allows is walked too."""
    pending: list[tuple[Any, str]] = [(body, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, dict):
            pending.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            pending.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif (
            isinstance(node, int)
            and not isinstance(node, bool)
            and not INT_RANGE[0] <= node <= INT_RANGE[1]
        ):
            raise InvalidRequest(
                f"{path} is {node}, outside the 64-bit integers every field takes "
                "(-2**63 to 2**64-1).",
                param=path or None,
                code="invalid_value",
            )


async def read_json(request: Request) -> Any:
    """The request's JSON body, read as FastAPI reads a body parameter: an empty body is
    missing, a content type other than JSON (`application/json`, `*+json`) or none is not
    an object, invalid JSON is a parse error (each a 400)."""
    raw = await request.body()
    if not raw:
        raise InvalidRequest(
            "The request body is missing; send a JSON object with 'Content-Type: application/json'."
        )
    content_type = request.headers.get("content-type")
    if content_type:
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        if message.get_content_maintype() != "application" or not (
            subtype == "json" or subtype.endswith("+json")
        ):
            raise _not_an_object()
    try:
        return json.loads(raw, parse_constant=_not_json)
    except ValueError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload."
        ) from None
    except RecursionError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is nested too deeply."
        ) from None


def _not_json(constant: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity`, which Python's parser accepts but JSON (RFC 8259)
    has no place for: an upstream would refuse the body, and no field takes them."""
    raise ValueError(f"{constant} is not JSON")


def _not_an_object() -> InvalidRequest:
    return InvalidRequest(
        "The request body must be a JSON object sent with 'Content-Type: application/json'."
    )


@functools.cache
def _adapter(body_type: Any) -> TypeAdapter[Any]:
    return TypeAdapter(body_type)


def parse_body(body_type: Any, raw: Any) -> Any:
    """`raw` as `body_type` (vLLM's request model, api/requests.py), or the 400 naming the
    first bad field."""
    if not isinstance(raw, dict):
        raise _not_an_object()
    try:
        return _adapter(body_type).validate_python(raw)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors(include_url=False))) from None


@dataclass(frozen=True)
class Generation:
    """Everything a generating route needs, resolved once (the key before the body)."""

    request: Request
    principal: Principal
    settings: Settings
    lifecycle: Lifecycle
    gateway: Gateway
    tracer: trace.Tracer
    backends: Backends
    allowed: set[str] = dataclass_field(default_factory=set)  # models the dispatch already checked

    @property
    def metrics(self) -> Metrics | None:
        """The process's metrics, or None with telemetry off."""
        metrics: Metrics = self.request.app.state.metrics
        return metrics if self.settings.telemetry.enabled else None

    @property
    def serving(self) -> Serving:
        """vLLM's serving objects (503 while the engine loads)."""
        return serving_of(self.request.app.state)

    async def dispatch(
        self, operation: str, local: Callable[[dict[str, Any]], Awaitable[Response]]
    ) -> Response:
        """Serve the body with the engine (`local`, given the parsed JSON) or upstream
        backends (module docstring)."""
        raw = await read_json(self.request)
        backends = self.backends
        name = raw.get("model") if isinstance(raw, dict) else None
        if not isinstance(name, str) or name in backends.local_names or not backends.serves(name):
            return await local(raw)
        check_allowed(name, self.principal)
        if LONG_INTEGER.search(await self.request.body()):  # cached: no second read
            check_integers(raw)
        if operation == "embeddings" and "stream" in raw:
            # as the engine's endpoint refuses it: an embedding is never streamed
            raise InvalidRequest(
                "Unrecognized request argument supplied: stream",
                param="stream",
                code="unknown_parameter",
            )
        routing = self.settings.routing
        if name in routing.cascades:
            return await self._cascade(name, raw, operation, local)
        if name in routing.routes:
            chain = self._route(name, raw, operation)
        else:
            chain = self._allowed_fallbacks(backends.resolve(name).chain)
        return await self._serve_chain(raw, operation, chain, name, local)

    def _allowed_fallbacks(self, chain: tuple[str, ...]) -> tuple[str, ...]:
        """`chain` without the fallbacks the key may not use: the name it sent (or its
        alias's target) stands, a fallback the operator configured does not open a model
        the key is kept from."""
        policy = self.principal.policy
        if policy is None:
            return chain
        return (chain[0], *(model for model in chain[1:] if policy.allows_model(model)))

    async def _serve_chain(
        self,
        raw: dict[str, Any],
        operation: str,
        chain: tuple[str, ...],
        requested: str,
        local: Callable[[dict[str, Any]], Awaitable[Response]],
        static_fallback: bool = True,
    ) -> Response:
        """Serve with the first model of `chain` that can, engine or upstreams
        (`static_fallback`: the static message of the chain's first model that has one may
        answer when all failed, also when the chain ended at a busy engine)."""
        self.allowed.update(chain)
        # the static message of the first model of the chain that has one (a route's
        # chain starts with whichever model is cheapest), wherever the chain ends
        messages = self.settings.routing.static_fallback
        static_model = next((m for m in chain if m in messages), None) if static_fallback else None
        index = 0
        attempts = 0  # made so far in this chain, on the engine and upstreams
        while True:
            model = chain[index]
            if self.backends.is_local(model):
                headers = response_headers(self.request.scope)
                headers["x-sluice-attempt"] = str(attempts + 1)
                try:
                    return await local({**raw, "model": model})
                except ServiceUnavailable as exc:  # loading, overloaded: the next model
                    if isinstance(exc, Draining):
                        raise
                    if index + 1 >= len(chain):
                        static = static_message(self.settings.routing, static_model, operation)
                        if static is None or not isinstance(exc, ENGINE_DOWN):
                            raise  # e.g. the limits store down: no backend's failure
                        return static_response(
                            parse_body(UpstreamShape, raw).normalised(raw),  # as an upstream's
                            operation,
                            *static,
                            str(exc),
                            self.metrics,
                            headers,
                            {},
                        )
                    index += 1
                    attempts += 1
                    continue
            try:
                return await self._upstream(raw, operation, chain[index:], requested, static_model)
            except LocalHandoff as handoff:
                index += handoff.index
                attempts += handoff.attempts

    def _caps(self, raw: dict[str, Any], operation: str) -> tuple[UpstreamShape, str | None, int]:
        """The body's fields sluice reads, checked against the key's and the server's caps:
        `(shape, the max_tokens parameter it named, max_tokens or the cap)`; max_tokens is 0
        for an endpoint without one (embeddings generate nothing)."""
        shape: UpstreamShape = parse_body(UpstreamShape, raw)
        limits = self.settings.limits
        # Several output caps given (`max_tokens` and `max_completion_tokens`, llama.cpp's
        # `n_predict`, ...): the largest counts, as an upstream may honour any of them, so
        # no cap or reservation can be passed by another name.
        params = MAX_TOKENS_PARAMS[operation]
        names = (*params, *OTHER_MAX_TOKENS_PARAMS) if params else ()
        given = [p for p in names if getattr(shape, p) is not None]
        named = max(given, key=lambda p: getattr(shape, p), default=None)
        requested = getattr(shape, named) if named is not None else None
        check_max_tokens(requested, named or "max_tokens", self.principal, limits)
        check_n(shape.n, shape.prompts(operation), limits)
        if requested is not None:
            return shape, named, requested
        if not MAX_TOKENS_PARAMS[operation]:
            return shape, None, 0
        policy = self.principal.policy
        caps = [limits.max_tokens_cap, policy.max_tokens if policy else None]
        return shape, named, min(cap for cap in caps if cap is not None)

    def upstream_body(
        self, raw: dict[str, Any], operation: str
    ) -> tuple[UpstreamShape, dict[str, Any], int]:
        """`(shape, the body to forward, the max_tokens it reserves)` for `raw` (checked by
        `_caps`). A body without OpenAI's output cap gets the endpoint's at what is
        reserved, so the output stays within the reservation, as on the engine."""
        shape, _, max_tokens = self._caps(raw, operation)
        body = shape.normalised(raw)
        params = MAX_TOKENS_PARAMS[operation]
        if params and all(getattr(shape, p) is None for p in params):
            # by the endpoint's current name (OpenAI's o-series refuse chat's older
            # `max_tokens`); also beside another server's name for it alone (`n_predict`),
            # which an upstream may not know. A cap of the client's own is never raised.
            body[params[0]] = max_tokens
        return shape, body, max_tokens

    def _route(self, name: str, raw: dict[str, Any], operation: str) -> tuple[str, ...]:
        """The models of a routing alias that fit this request, cheapest first."""
        _, _, max_tokens = self._caps(raw, operation)
        return self.backends.router.choose(
            name,
            self.settings.routing.routes[name],
            estimate_prompt_tokens(raw),
            max_tokens,
            needed_tags(raw),
        )

    async def _cascade(
        self,
        name: str,
        raw: dict[str, Any],
        operation: str,
        local: Callable[[dict[str, Any]], Awaitable[Response]],
    ) -> Response:
        """Try the cascade's models in order, each answer judged whole (backends/router.py);
        the last model streams live when the client asked for a stream."""
        if operation not in ("chat", "text_completion"):
            raise InvalidRequest(
                f"'{name}' is a cascade, which serves chat and completions only.", param="model"
            )
        cascade = self.settings.routing.cascades[name]
        headers = response_headers(self.request.scope)
        shape: UpstreamShape = parse_body(UpstreamShape, raw)  # read as the attempts read it
        raw = shape.normalised(raw)
        stream = shape.stream is True
        include_usage = bool((shape.stream_options or {}).get("include_usage"))
        wants_logprobs = bool(shape.logprobs)
        tried: list[str] = []
        for model in cascade.models[:-1]:
            tried.append(model)
            trial = {**raw, "stream": False}
            trial.pop("stream_options", None)
            if "logprob" in cascade.escalate_on and not wants_logprobs:
                trial["logprobs"] = True if operation == "chat" else 1
            try:
                chain = self._allowed_fallbacks(self.backends.resolve(model).chain)
                # a try that fails escalates: the static message is the last model's
                response = await self._serve_chain(
                    trial, operation, chain, name, local, static_fallback=False
                )
            except SluiceError as exc:
                if spec_for(exc).status < 500 and not isinstance(exc, UpstreamRateLimited):
                    raise  # the request's own fault: the next model would refuse it too
                if isinstance(exc, RequestTimedOut | Draining):
                    raise  # the request's own time is up (or the server's): no next try
                logger.warning("cascade %s: %s failed (%s); escalating", name, model, exc)
                continue
            if response.status_code != 200:  # the client left (a 499 nobody reads)
                return response
            if isinstance(response, OwnedResponse):
                await response.close_owner()  # judged here, not sent
            answer = json.loads(bytes(response.body))
            signal = escalation(cascade, raw, answer)
            if signal is None:
                headers["x-sluice-cascade"] = ",".join(tried)
                if not wants_logprobs and "logprob" in cascade.escalate_on:
                    for choice in answer.get("choices") or []:
                        choice["logprobs"] = None
                if stream:
                    return Response(
                        as_stream(answer, include_usage),
                        media_type="text/event-stream",
                        headers=_rate_headers(response),
                    )
                return Response(
                    json.dumps(answer),
                    media_type="application/json",
                    headers=_rate_headers(response),
                )
            logger.info("cascade %s: %s escalated (%s)", name, model, signal)
        last = cascade.models[-1]
        headers["x-sluice-cascade"] = ",".join([*tried, last])
        chain = self._allowed_fallbacks(self.backends.resolve(last).chain)
        return await self._serve_chain(raw, operation, chain, name, local)

    async def _upstream(
        self,
        raw: dict[str, Any],
        operation: str,
        chain: tuple[str, ...],
        requested: str,
        static_model: str | None,
    ) -> Response:
        """The request through upstream backends (backends/proxy.py); `static_model`'s
        static fallback message answers when every attempt failed."""
        shape, body, max_tokens = self.upstream_body(raw, operation)
        record = record_of(self.request.scope)
        if record is not None:
            record.model = chain[0]
        state = self.request.app.state
        call = UpstreamCall(
            body=body,
            operation=operation,
            chain=chain,
            requested=requested,
            principal=self.principal,
            settings=self.settings,
            backends=self.backends,
            gateway=self.gateway,
            lifecycle=self.lifecycle,
            budget=state.retry_budget,
            metrics=self.metrics,
            record=record,
            tracer=self.tracer,
            # the id the middleware settled on (the client's, cut to length, or a new one)
            request_id=str(self.request.scope.get("state", {}).get("request_id", "")),
            max_tokens=max_tokens,
            response_headers=response_headers(self.request.scope),
            outputs=(shape.n or 1) * shape.prompts(operation),
            static_model=static_model,
        )
        try:
            await call.reserve()
            outcome, result = await _run(self.request, call.open, call.deadline, self.lifecycle)
        except BaseException as exc:
            await call.close(exc)
            raise
        if outcome != "done":
            return await _cut_short(outcome, call, record)
        if isinstance(result, Response):  # the static fallback
            await call.close()
            return result
        if result.stream is not None:
            keep_alive = float(getattr(self.serving_args, "sse_keep_alive_interval", 0) or 0)
            return SSEResponse(
                call.frames(result),
                call,
                keep_alive,
                responses_api=operation == "generate_content",
            )
        return call.body_response(result)  # closes the call once sent

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
        CLIENT_PARAMS.set(_client_params(operation, shape))
        model = self.model_of(body)
        if model not in self.allowed:
            check_allowed(model, self.principal)
        limits = self.settings.limits
        check_max_tokens(shape.max_tokens, shape.max_tokens_param, self.principal, limits)
        check_n(shape.n, shape.prompts, limits, embeddings=operation == "embeddings")
        record = record_of(self.request.scope)
        if self.serves(model):
            headers = response_headers(self.request.scope)
            # the attempt the chain reached the engine at (`_serve_chain`), else the first
            attempt = headers.setdefault("x-sluice-attempt", "1")
            headers.update({"x-sluice-backend": LOCAL, "x-sluice-model": model})
            if record is not None:
                record.model = model  # a metric label: only ids this server serves (bounded)
                record.backend = LOCAL
                record.attempt = int(attempt)
        exchange = Exchange.open(
            principal=self.principal,
            gateway=self.gateway,
            lifecycle=self.lifecycle,
            limits=limits,
            model=model,
            operation=operation,
            engine_client=self.serving.models.engine_client,
            # a body that asked vLLM to truncate its prompt gets vLLM's lowered max_tokens
            requested_max_tokens=None if _truncates(body) else shape.max_tokens,
            record=record,
            tracer=self.tracer,
        )
        if record is not None and self.settings.telemetry.log_prompts:
            record.prompt_text = _prompt_text(body)
            record.output_text = []
        REQUEST_OBSERVER.set(exchange)
        try:
            outcome, result = await _run(self.request, call, exchange.deadline, self.lifecycle)
        except Exception as exc:
            await exchange.close(exc)
            raise exchange.error or from_exception(exc) from exc
        if outcome != "done":
            return await _cut_short(outcome, exchange, record)
        if isinstance(result, ErrorResponse) or exchange.error is not None:
            await exchange.close()
            raise exchange.error or from_vllm(
                result.error.code, result.error.message, result.error.param
            )
        if hasattr(result, "__anext__"):
            keep_alive = float(getattr(self.serving_args, "sse_keep_alive_interval", 0) or 0)
            return SSEResponse(
                result,
                exchange,
                keep_alive,
                observer=exchange,
                responses_api=operation == "generate_content",
            )
        if isinstance(result, Response):
            await exchange.close()
            result.headers.update(exchange.headers)
            return result
        try:
            # JSON names, as vLLM's routes write a response (`schema`, not `schema_`)
            content = result.model_dump_json(by_alias=operation == "generate_content")
        except BaseException as exc:  # nothing else would close the exchange
            await exchange.close(exc)
            raise
        return OwnedResponse(content, exchange)  # closes it once sent

    @property
    def serving_args(self) -> Any:
        return self.request.app.state.engine.args


async def _generation(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    lifecycle: LifecycleDep,
    gateway: GatewayDep,
    tracer: TracerDep,
) -> Generation:
    # a coroutine, not the class itself: FastAPI would run a class in a worker thread
    backends: Backends = request.app.state.backends
    return Generation(request, principal, settings, lifecycle, gateway, tracer, backends)


GenerationDep = Annotated[Generation, Depends(_generation)]


async def _run(
    request: Request,
    call: Callable[[], Awaitable[Any]],
    deadline: float,
    lifecycle: Lifecycle,
) -> tuple[str, Any]:
    """Run `call` until it returns (`("done", result)`), the deadline passes (`"timeout"`),
    the client disconnects (`"disconnected"`) or a drain that ran out of time cuts it off
    (`"cut_off"`); all but the first cancel it."""
    work = asyncio.ensure_future(call())
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    outcome = "timeout"
    cut = False

    def cut_off() -> None:
        nonlocal cut
        cut = True
        watch.cancel()  # ends the wait below

    unregister = lifecycle.on_cut_off(cut_off)
    try:
        done, _ = await asyncio.wait(
            {work, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if cut:
            outcome = "cut_off"
        elif work in done:
            outcome = "done"
        elif watch in done:
            outcome = "disconnected"
    finally:
        unregister()
        watch.cancel()
        if not work.done():
            # vLLM's non-streaming generators turn cancellation into an error response.
            work.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await work
    return outcome, work.result() if outcome == "done" else None


async def _cut_short(outcome: str, owner: StreamOwner, record: RequestRecord | None) -> Response:
    """End a request `_run` cut short: past the time limit (raises the 504), cut off by the
    end of a drain (raises the 503), or the client gone (a 499 nobody reads, for the
    record)."""
    if outcome in ("timeout", "cut_off"):
        error = owner.timed_out() if outcome == "timeout" else Lifecycle.cut_off_error()
        await owner.close(error)
        raise error
    if record is not None:
        record.fail(CLIENT_CLOSED_REQUEST, "client_closed_request")
    await owner.close(ClientDisconnected())
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _truncates(body: BaseModel) -> bool:
    """The body asks vLLM to cut a prompt that does not fit (completions' and chat's
    `truncate_prompt_tokens`, the Responses API's `truncation: auto`): then the output gets
    what room is left, as vLLM's server gives it, rather than a `context_length_exceeded`."""
    return (
        getattr(body, "truncate_prompt_tokens", None) is not None
        or getattr(body, "truncation", "disabled") != "disabled"  # vLLM: null cuts too
    )


def _client_params(operation: str, shape: Shape) -> dict[str, str] | None:
    """What the client calls the fields vLLM's errors name (errors.CLIENT_PARAMS)."""
    names = {"response_id": "previous_response_id"} if operation == "generate_content" else {}
    if shape.max_tokens_param != "max_tokens":
        names["max_tokens"] = shape.max_tokens_param
    return names or None


def _rate_headers(response: Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit")}


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
