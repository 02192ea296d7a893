"""Routes: vLLM's OpenAI endpoints behind the gateway, model listing, tokenizing, probes.

Each generating route is as thin as vLLM's own: it names the body's vLLM request model and
hands vLLM's serving call to `Generation.serve` (api/generation.py), which owns the rest.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import BaseRoute
from vllm import envs
from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from sluice import __version__
from sluice.api.deps import (
    EngineDep,
    LifecycleDep,
    PrincipalDep,
    ServingDep,
    SettingsDep,
    serving_of,
)
from sluice.api.generation import GenerationDep, Shape, parse_body, prompt_count
from sluice.api.requests import (
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    EmbeddingBody,
    ResponsesBody,
    TokenizeBody,
    check_fields,
)
from sluice.api.serving import Serving
from sluice.backends.registry import Backends
from sluice.errors import InvalidRequest, ModelNotFound, Unauthenticated, from_vllm
from sluice.gateway.auth import Principal
from sluice.gateway.guards import check_allowed
from sluice.lifecycle import DRAINING_RETRY_AFTER_S, LOADING_RETRY_AFTER_S, Phase

router = APIRouter()


# Each generating route: `dispatch` sends the body to an upstream backend, or to the local
# handler, which parses it with vLLM's request model (a 400 naming the field) and serves it
# with the engine.


@router.post("/v1/chat/completions")
async def create_chat_completion(generation: GenerationDep) -> Response:
    async def local(raw: dict[str, Any]) -> Response:
        body = parse_body(ChatBody, raw)
        named = body.max_completion_tokens is not None
        shape = Shape(
            # past pydantic's descriptor: vLLM marks `max_tokens` deprecated (as OpenAI does)
            max_tokens=body.max_completion_tokens if named else vars(body)["max_tokens"],
            max_tokens_param="max_completion_tokens" if named else "max_tokens",
            n=body.n,
        )
        chat = generation.serving.chat
        return await generation.serve(
            body, "chat", lambda: chat.create_chat_completion(body, generation.request), shape
        )

    return await generation.dispatch("chat", local)


@router.post("/v1/completions")
async def create_completion(generation: GenerationDep) -> Response:
    async def local(raw: dict[str, Any]) -> Response:
        body = parse_body(CompletionBody, raw)
        if body.prompt is None and body.prompt_embeds is None:
            # OpenAI: no prompt means "from the start of a new document" (its <|endoftext|>).
            tokenizer = generation.serving.models.engine_client.renderer.get_tokenizer()
            start = tokenizer.bos_token_id
            body.prompt = [start if start is not None else tokenizer.eos_token_id]
        shape = Shape(max_tokens=body.max_tokens, n=body.n, prompts=prompt_count(body.prompt))
        completion = generation.serving.completion
        return await generation.serve(
            body,
            "text_completion",
            lambda: completion.create_completion(body, generation.request),
            shape,
        )

    return await generation.dispatch("text_completion", local)


@router.post("/v1/responses")
async def create_response(generation: GenerationDep) -> Response:
    async def local(raw: dict[str, Any]) -> Response:
        body = parse_body(ResponsesBody, raw)
        responses = generation.serving.responses
        _check_responses_fields(body, responses)

        async def call() -> Any:
            result = await responses.create_responses(body, generation.request)
            if hasattr(result, "__anext__"):
                return _convert_stream_to_sse_events(result)
            return result

        shape = Shape(max_tokens=body.max_output_tokens, max_tokens_param="max_output_tokens")
        return await generation.serve(body, "generate_content", call, shape)

    return await generation.dispatch("generate_content", local)


def _check_responses_fields(body: Any, responses: Any) -> None:
    """What vLLM's Responses model declares but this server cannot honour, refused as chat
    refuses it (api/requests.py) instead of ignored: storage (no response store unless
    vLLM's `VLLM_ENABLE_RESPONSES_API_STORE`), a service tier other than auto/default, and
    built-in tools (`web_search`, `mcp`, ...) without vLLM's tool server."""
    stored = envs.VLLM_ENABLE_RESPONSES_API_STORE
    no_store = "this server stores no responses (vLLM's VLLM_ENABLE_RESPONSES_API_STORE is off)"
    refusals: list[tuple[str, str]] = []
    if body.previous_response_id is not None and not stored:
        # vLLM would answer 404 "not found", which clients read as an unknown model
        refusals.append(("previous_response_id", f"{no_store}; send the earlier turns in 'input'"))
    if "store" in body.model_fields_set and body.store and not stored:
        refusals.append(("store", f"{no_store}; leave 'store' unset or false"))
    if body.service_tier not in (None, "auto", "default"):
        refusals.append(("service_tier", f"{body.service_tier!r}: use 'auto' or 'default'"))
    builtin = [t.type for t in body.tools or [] if t.type not in ("function", "custom")]
    if builtin and getattr(responses, "tool_server", None) is None:
        kinds = ", ".join(builtin)
        refusals.append(("tools", f"built-in tools ({kinds}) need vLLM's --tool-server"))
    if refusals:
        name, why = refusals[0]
        raise InvalidRequest(
            f"'{name}' is not supported: {why}.", param=name, code="unsupported_value"
        )


@router.post("/v1/embeddings")
async def create_embedding(generation: GenerationDep) -> Response:
    async def local(raw: dict[str, Any]) -> Response:
        body = parse_body(EmbeddingBody, raw)
        model = generation.model_of(body)
        check_allowed(model, generation.principal)  # 403 first, as on every endpoint
        if not generation.serves(model):  # 404 before "this model does not embed"
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            )
        embedding = generation.serving.embedding
        shape = Shape(prompts=prompt_count(getattr(body, "input", None)))
        return await generation.serve(
            body, "embeddings", lambda: embedding(body, generation.request), shape
        )

    return await generation.dispatch("embeddings", local)


def _tokenizing(body: Any, principal: Principal, serving: Serving) -> None:
    check_fields(body)
    check_allowed(body.model or serving.models.base_model_paths[0].name, principal)


def _json(result: Any) -> Response:
    if isinstance(result, ErrorResponse):
        raise from_vllm(result.error.code, result.error.message, result.error.param)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/tokenize")
async def tokenize(
    body: TokenizeBody, request: Request, principal: PrincipalDep, serving: ServingDep
) -> Response:
    """vLLM's tokenizer endpoint: token ids of a prompt or of chat messages."""
    _tokenizing(body, principal, serving)
    return _json(await serving.tokenization.create_tokenize(body, request))


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeBody, request: Request, principal: PrincipalDep, serving: ServingDep
) -> Response:
    """vLLM's detokenizer endpoint: the text of token ids (an id out of the vocabulary is
    a 400, as in a prompt: vLLM's own check, which its detokenizer skips)."""
    _tokenizing(body, principal, serving)
    serving.models.engine_client.renderer.validate_token_ids(body.tokens, parameter="tokens")
    return _json(await serving.tokenization.create_detokenize(body, request))


async def _models(request: Request, principal: Principal) -> list[dict[str, Any]]:
    """The models this key may use, as OpenAI model objects: the engine's names and LoRA
    adapters (once it has loaded), then every upstream model and alias."""
    state = request.app.state
    cards: list[dict[str, Any]] = []
    if state.serving is not None:
        listing = await state.serving.models.show_available_models()
        cards = [card.model_dump() for card in listing.data]
    elif not state.backends.upstreams:
        serving_of(state)  # 503 while the engine loads, as before there were upstreams
    backends: Backends = state.backends
    cards += [
        {"id": name, "object": "model", "created": backends.created, "owned_by": owner}
        for name, owner in backends.client_names()
    ]
    policy = principal.policy
    return [card for card in cards if policy is None or policy.allows_model(card["id"])]


@router.get("/v1/models")
async def list_models(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    return {"object": "list", "data": await _models(request, principal)}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(
    model_id: str, request: Request, principal: PrincipalDep
) -> dict[str, Any]:
    cards = await _models(request, principal)
    if not model_id:  # `/v1/models/`: the listing, as vLLM's trailing-slash redirect gives
        return {"object": "list", "data": cards}
    for card in cards:
        if card["id"] == model_id:
            return card
    raise ModelNotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.", param="model"
    )


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
@router.get("/health")
async def healthz(lifecycle: LifecycleDep) -> JSONResponse:
    """Liveness (`/health` is vLLM's name for it): the process answers; 503 only once the
    engine has failed."""
    if lifecycle.phase is Phase.DEAD:
        return JSONResponse({"status": "dead", "reason": lifecycle.failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict[str, str]:
    """vLLM's version (as vLLM's own server answers) and sluice's."""
    from vllm import __version__ as vllm_version

    return {"version": vllm_version, "sluice_version": __version__}


@router.get("/readyz")
async def readyz(request: Request, lifecycle: LifecycleDep, engine: EngineDep) -> JSONResponse:
    """Readiness: 200 only when generation requests would be served; the body also gives
    each upstream backend's breaker state, health and requests in flight."""
    body: dict[str, Any] = {
        "status": lifecycle.phase.value,
        "in_flight": lifecycle.in_flight,
        "model_load_seconds": lifecycle.load_seconds,
    }
    if lifecycle.phase is Phase.LOADING:
        body["step"] = lifecycle.step
    if engine.ready:
        stats = engine.stats()
        body["engine"] = {
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": stats.kv_cache_usage,
        }
    backends: Backends = request.app.state.backends
    if backends.upstreams:
        body["backends"] = backends.states()
    status = 200 if lifecycle.phase is Phase.READY else 503
    retry_after = (
        DRAINING_RETRY_AFTER_S if lifecycle.phase is Phase.DRAINING else LOADING_RETRY_AFTER_S
    )
    headers = {} if status == 200 else {"Retry-After": str(int(retry_after))}
    return JSONResponse(body, status_code=status, headers=headers)


# The OpenAPI document describes each generating route's body with vLLM's request model, as
# it did when FastAPI parsed the body: the routes now read it themselves (`dispatch` looks at
# `model` first), so these typed stand-ins, never called, lend the document their schema.
documented = APIRouter()


@documented.post("/v1/chat/completions")
async def create_chat_completion_doc(body: ChatBody) -> None:
    """Chat completions (OpenAI's, vLLM's fields)."""


@documented.post("/v1/completions")
async def create_completion_doc(body: CompletionBody) -> None:
    """Completions (OpenAI's legacy endpoint, vLLM's fields)."""


@documented.post("/v1/responses")
async def create_response_doc(body: ResponsesBody) -> None:
    """Responses (OpenAI's Responses API, as vLLM serves it)."""


@documented.post("/v1/embeddings")
async def create_embedding_doc(body: EmbeddingBody) -> None:
    """Embeddings (a pooling model)."""


def openapi_routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """The app's routes as the OpenAPI document shows them: stand-ins for the generating
    ones."""
    standing_in = {route.path for route in documented.routes if isinstance(route, APIRoute)}
    kept = [r for r in routes if not (isinstance(r, APIRoute) and r.path in standing_in)]
    return [*kept, *documented.routes]
