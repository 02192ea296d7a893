"""Routes: OpenAI's `/v1/*` endpoints and the health probes. Thin: parse, plan, run."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from sluice.api.deps import (
    EngineDep,
    Generation,
    GenerationDep,
    LifecycleDep,
    PrincipalDep,
    SettingsDep,
)
from sluice.api.plan import GenerationJob, plan_chat, plan_completion
from sluice.api.run import CLIENT_CLOSED_REQUEST
from sluice.api.schemas import ChatCompletionRequest, CompletionRequest
from sluice.api.streaming import SSEResponse, cancel_on_disconnect
from sluice.engine.protocol import Engine, ModelCard
from sluice.errors import ModelLoading, ModelNotFound, Unauthenticated
from sluice.gateway.guards import Caps
from sluice.lifecycle import DRAINING_RETRY_AFTER_S, LOADING_RETRY_AFTER_S, Phase
from sluice.telemetry.record import record_of

router = APIRouter()


def _prompt_text(body: CompletionRequest | ChatCompletionRequest) -> str:
    if isinstance(body, CompletionRequest):
        return "\n".join(body.prompts())
    return "\n".join(f"{m.role}: {m.text()}" for m in body.messages)


async def _serve(
    generation: Generation,
    plan: Callable[[Caps], GenerationJob],
    body: CompletionRequest | ChatCompletionRequest,
) -> Response:
    """Admit, plan, reserve, run; the slot and the reservation are released exactly once."""
    request, principal, gateway = generation.request, generation.principal, generation.gateway
    lifecycle, runner = generation.lifecycle, generation.runner
    record = record_of(request.scope)
    lifecycle.admit()
    try:
        clamp = gateway.admit(principal)  # shed before any tokenising
        job = plan(Caps(principal, clamp))
        ticket = await gateway.reserve(
            principal, job.model, job.prompt_tokens, job.max_output_tokens
        )
    except BaseException:
        lifecycle.release()
        raise

    async def close() -> None:
        lifecycle.release()
        await gateway.settle(ticket)

    def on_tokens(count: int) -> None:
        gateway.on_tokens(ticket, count)

    if record is not None:
        record.model = job.model
        record.prompt_tokens = job.prompt_tokens
        if generation.settings.telemetry.log_prompts:
            record.prompt_text = _prompt_text(body)
            record.output_text = []
    if job.stream:
        return SSEResponse(
            runner.sse_events(job, record, on_tokens), on_close=close, headers=ticket.headers
        )
    try:
        finished, result = await cancel_on_disconnect(
            request, runner.collect(job, record, on_tokens)
        )
    finally:
        with anyio.CancelScope(shield=True):
            await close()
    if not finished:
        if record is not None:
            record.fail(CLIENT_CLOSED_REQUEST, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(result, headers=ticket.headers)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, generation: GenerationDep) -> Response:
    engine, settings = generation.engine, generation.settings
    return await _serve(
        generation, lambda caps: plan_completion(body, engine, settings, caps), body
    )


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, generation: GenerationDep
) -> Response:
    engine, settings = generation.engine, generation.settings
    return await _serve(generation, lambda caps: plan_chat(body, engine, settings, caps), body)


def _card(engine: Engine) -> ModelCard:
    if not engine.ready:
        raise ModelLoading(
            "The model is still loading. Retry shortly.", retry_after_s=LOADING_RETRY_AFTER_S
        )
    return engine.model_card()


def _model_object(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "max_model_len": card.max_model_len,
    }


@router.get("/v1/models")
async def list_models(engine: EngineDep, _: PrincipalDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(_card(engine))]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, engine: EngineDep, _: PrincipalDep) -> dict[str, Any]:
    card = _card(engine)
    if model_id != card.id:
        raise ModelNotFound(f"The model '{model_id}' does not exist on this server.", param="model")
    return _model_object(card)


@router.get("/metrics")
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format: sluice's families, then vLLM's own `vllm:*` metrics."""
    token = settings.telemetry.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise Unauthenticated("/metrics needs 'Authorization: Bearer <metrics token>'.")
    exposition: bytes = request.app.state.metrics.exposition()
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz(lifecycle: LifecycleDep) -> JSONResponse:
    """Liveness: the process answers; 503 only once the engine has failed."""
    if lifecycle.phase is Phase.DEAD:
        return JSONResponse({"status": "dead", "reason": lifecycle.failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(lifecycle: LifecycleDep, engine: EngineDep) -> JSONResponse:
    """Readiness: 200 only when generation requests would be served."""
    body: dict[str, Any] = {
        "status": lifecycle.phase.value,
        "in_flight": lifecycle.in_flight,
        "model_load_seconds": lifecycle.load_seconds,
    }
    if engine.ready:
        stats = engine.stats()
        body["engine"] = {
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": stats.kv_cache_usage,
        }
    status = 200 if lifecycle.phase is Phase.READY else 503
    retry_after = (
        DRAINING_RETRY_AFTER_S if lifecycle.phase is Phase.DRAINING else LOADING_RETRY_AFTER_S
    )
    headers = {} if status == 200 else {"Retry-After": str(int(retry_after))}
    return JSONResponse(body, status_code=status, headers=headers)
