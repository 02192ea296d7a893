"""Per-request model choice: routing aliases (`ModelRouter`) and cascade signals.

A routing alias (`routing.routes`) names candidate models; per request, `ModelRouter.choose`
keeps those that meet every constraint and orders them by the request's estimated price
(prompt estimate at the input price plus `max_tokens` at the output price), cheapest first
(the seed design's "cheapest model that fits"). The first answers; the others that fit are
its fallbacks. Constraints:

- context length: the prompt (estimated) plus `max_tokens` within the model's
  `routing.models[name].context_length` (the engine's `max_model_len` for its own models;
  a model with neither is taken to fit);
- capability tags the request needs (`tools` when it sends tools, `vision` for image parts,
  `audio` for audio parts, `json_schema` for a `response_format` of that type) among the
  model's `routing.models[name].tags`;
- the route's latency ceiling `max_ttft_s` against the model's median time to first token
  over its last `LatencyWindow.size` requests (a model with no figures yet is taken to meet
  it);
- the route's price ceiling `max_usd_per_mtok` against the model's output price.

When none fits, a 400 names each constraint and what the closest model offers.

A cascade alias (`routing.cascades`) tries its models cheapest first; `escalation` says
whether an answer should go to the next model: `length` (a choice ended by `max_tokens`),
`schema` (the content is not JSON valid against the request's `response_format` schema,
jsonschema's Draft 2020-12 validator; or not a JSON object for `json_object`), `logprob`
(the mean token logprob of the answer under `min_mean_logprob`).
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from sluice.config import CascadeSettings, ModelPrice, RouteSettings, RoutingSettings
from sluice.errors import InvalidRequest


class LatencyWindow:
    """Each model's last `size` times to first token, seconds."""

    size = 50

    def __init__(self) -> None:
        self._ttft: dict[str, deque[float]] = {}

    def observe(self, model: str, ttft_s: float) -> None:
        self._ttft.setdefault(model, deque(maxlen=self.size)).append(ttft_s)

    def median(self, model: str) -> float | None:
        """The median of `model`'s recent figures, None before any."""
        figures = self._ttft.get(model)
        return statistics.median(figures) if figures else None


def needed_tags(body: dict[str, Any]) -> set[str]:
    """The capabilities a request needs (module docstring)."""
    tags: set[str] = set()
    if body.get("tools"):
        tags.add("tools")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        tags.add("json_schema")
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image"):
                tags.add("vision")
            elif kind in ("input_audio", "audio_url"):
                tags.add("audio")
    return tags


@dataclass(frozen=True)
class Candidate:
    """What the router knows of one model."""

    name: str
    price: ModelPrice
    context_length: int | None
    tags: frozenset[str]
    ttft_s: float | None


class ModelRouter:
    """Choose models for a routing alias (module docstring)."""

    def __init__(
        self,
        routing: RoutingSettings,
        price_of: Callable[[str], ModelPrice],
        context_of: Callable[[str], int | None],
        latency: LatencyWindow,
    ) -> None:
        self.routing = routing
        self.price_of = price_of
        self.context_of = context_of
        self.latency = latency

    def candidate(self, name: str) -> Candidate:
        spec = self.routing.models.get(name)
        context = spec.context_length if spec and spec.context_length else self.context_of(name)
        return Candidate(
            name,
            self.price_of(name),
            context,
            frozenset(spec.tags if spec else ()),
            self.latency.median(name),
        )

    def choose(
        self, alias: str, route: RouteSettings, prompt_tokens: int, max_tokens: int, tags: set[str]
    ) -> tuple[str, ...]:
        """The models that fit, cheapest first; raises the 400 when none does."""
        needed = prompt_tokens + max_tokens
        fits: list[tuple[float, int, str]] = []
        misses: dict[str, list[Candidate]] = {}
        for order, name in enumerate(route.models):
            c = self.candidate(name)
            failed = []
            if c.context_length is not None and needed > c.context_length:
                failed.append("context_length")
            if not tags <= c.tags:
                failed.append("tags")
            if (
                route.max_ttft_s is not None
                and c.ttft_s is not None
                and c.ttft_s > route.max_ttft_s
            ):
                failed.append("latency")
            if (
                route.max_usd_per_mtok is not None
                and c.price.output_usd_per_mtok > route.max_usd_per_mtok
            ):
                failed.append("price")
            for constraint in failed:
                misses.setdefault(constraint, []).append(c)
            if not failed:
                fits.append((c.price.cost(prompt_tokens, max_tokens), order, name))
        if fits:
            return tuple(name for _, _, name in sorted(fits))
        raise InvalidRequest(
            f"No model behind '{alias}' fits this request: "
            + "; ".join(self._explain(k, v, needed, tags, route) for k, v in misses.items())
            + ".",
            param="model",
            code="no_model_fits",
        )

    @staticmethod
    def _explain(
        constraint: str, failed: list[Candidate], needed: int, tags: set[str], route: RouteSettings
    ) -> str:
        if constraint == "context_length":
            largest = max(c.context_length or 0 for c in failed)
            return (
                f"context length: it needs about {needed} tokens (prompt + max_tokens), the "
                f"largest context is {largest}"
            )
        if constraint == "tags":
            return f"capabilities: it needs {sorted(tags)}"
        if constraint == "latency":
            fastest = min(c.ttft_s or 0.0 for c in failed)
            return (
                f"latency: the ceiling is {route.max_ttft_s:g} s to the first token, the "
                f"fastest model's median is {fastest:.3g} s"
            )
        cheapest = min(c.price.output_usd_per_mtok for c in failed)
        return (
            f"price: the ceiling is {route.max_usd_per_mtok:g} USD per million output tokens, "
            f"the cheapest model costs {cheapest:g}"
        )


def escalation(cascade: CascadeSettings, request: dict[str, Any], answer: Any) -> str | None:
    """Why `answer` (a chat or completion body) should go to the cascade's next model: the
    signal that fired (`length`, `schema`, `logprob`), or None to keep it."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    choices = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    if not choices:
        return None
    signals = cascade.escalate_on
    if "length" in signals and any(c.get("finish_reason") == "length" for c in choices):
        return "length"
    if "schema" in signals and not _meets_format(request.get("response_format"), choices):
        return "schema"
    if "logprob" in signals:
        mean = _mean_logprob(choices)
        if mean is not None and mean < cascade.min_mean_logprob:
            return "logprob"
    return None


def _meets_format(response_format: Any, choices: list[dict[str, Any]]) -> bool:
    if not isinstance(response_format, dict):
        return True
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return True
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    for choice in choices:
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if not isinstance(text, str):
            return False
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        if kind == "json_object" and not isinstance(value, dict):
            return False
        if kind == "json_schema" and isinstance(schema, dict):
            try:
                jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
            except (jsonschema.ValidationError, RecursionError):
                return False
            except jsonschema.SchemaError:
                return True  # the request's schema is not one: nothing to judge against
    return True


def _mean_logprob(choices: list[dict[str, Any]]) -> float | None:
    """The mean token logprob over every choice (chat `logprobs.content[].logprob`,
    completions `logprobs.token_logprobs`), None without logprobs."""
    values: list[float] = []
    for choice in choices:
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            continue
        content = logprobs.get("content")
        for token in content if isinstance(content, list) else []:
            if isinstance(token, dict) and _number(token.get("logprob")):
                values.append(float(token["logprob"]))
        token_logprobs = logprobs.get("token_logprobs")
        if isinstance(token_logprobs, list):
            values += [float(v) for v in token_logprobs if _number(v)]
    return statistics.fmean(values) if values else None


def _number(value: Any) -> bool:
    """A JSON number an upstream sent where one belongs (not a bool, a string or null)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 1 << 1000  # a float can hold it
    return isinstance(value, float)


def as_stream(body: dict[str, Any], include_usage: bool) -> str:
    """A whole chat or completion body as the SSE stream a streaming client expects: one
    chunk with each choice's whole content, the usage chunk if asked, `[DONE]`."""
    chat = body.get("object") == "chat.completion"
    head = {k: body.get(k) for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    choices = []
    for choice in body.get("choices") or []:
        if chat:
            message = dict(choice.get("message") or {})
            for index, call in enumerate(message.get("tool_calls") or []):
                call.setdefault("index", index)
            delta = {k: v for k, v in message.items() if v is not None}
            item = {"index": choice.get("index", 0), "delta": delta}
        else:
            item = {"index": choice.get("index", 0), "text": choice.get("text", "")}
        item["finish_reason"] = choice.get("finish_reason")
        item["logprobs"] = choice.get("logprobs")
        choices.append(item)
    frames = [{**head, "choices": choices}]
    if include_usage and body.get("usage") is not None:
        frames.append({**head, "choices": [], "usage": body["usage"]})
    return "".join(f"data: {json.dumps(f, separators=(',', ':'))}\n\n" for f in frames) + (
        "data: [DONE]\n\n"
    )
