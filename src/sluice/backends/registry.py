"""`Backends`: which backend serves each model name, and the names clients may use.

A served name belongs either to the in-process engine (its `served_model_name`s and LoRA
adapters) or to one or more upstreams (`backends:` in the settings), never both. On top:

- aliases (`routing.aliases`): another name for a served name;
- fallback chains (`routing.fallbacks`): the models tried, in order, when every backend of
  a model failed (engine or upstream);
- routing aliases (`routing.routes`) and cascades (`routing.cascades`), resolved per
  request (backends/router.py).

A model several upstreams serve is balanced by least outstanding requests among the
available ones (healthy, under their cap, breaker not open; ties go to the first listed).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sluice.backends.router import LatencyWindow, ModelRouter
from sluice.backends.upstream import Upstream
from sluice.config import ModelPrice, Settings
from sluice.telemetry.record import RequestRecord

LOCAL = "engine"  # the `backend` label of the in-process engine


class BackendsError(ValueError):
    """A `backends:` or `routing:` configuration sluice cannot serve (the CLI exits 2)."""


@dataclass(frozen=True)
class Resolved:
    """A client's model name resolved: the served name to try first and its chain."""

    requested: str
    chain: tuple[str, ...]  # served names, in order: the model, then its fallbacks


class Backends:
    """The upstreams and the names they serve (module docstring)."""

    def __init__(self, settings: Settings, local_names: Iterable[str]) -> None:
        routing = settings.routing
        self.routing = routing
        self.local_names = set(local_names)
        try:
            self.upstreams = [
                Upstream(
                    backend,
                    settings.pricing,
                    breaker_failures=routing.breaker_failures,
                    breaker_recovery_s=routing.breaker_recovery_s,
                )
                for backend in settings.backends
            ]
        except ValueError as exc:
            raise BackendsError(str(exc)) from None
        self.by_model: dict[str, list[Upstream]] = {}
        for upstream in self.upstreams:
            for name in upstream.models:
                self.by_model.setdefault(name, []).append(upstream)
        self._check()
        self._tasks: list[asyncio.Task[None]] = []
        self.created = int(time.time())
        self.pricing = settings.pricing
        self.local_context: int | None = None  # the engine's max_model_len, once loaded
        self.latency = LatencyWindow()
        self.router = ModelRouter(routing, self.price_of, self.context_of, self.latency)

    def _check(self) -> None:
        """Refuse a configuration that names what nothing serves."""
        names = [upstream.name for upstream in self.upstreams]
        if len(set(names)) != len(names) or LOCAL in names:
            raise BackendsError(f"backend names must be unique and not '{LOCAL}': {names}")
        shared = self.local_names & set(self.by_model)
        if shared:
            raise BackendsError(
                f"{sorted(shared)}: served by the engine and by an upstream; give one a "
                "different served name"
            )
        served = self.local_names | set(self.by_model)
        routing = self.routing
        clients = set(routing.aliases) | set(routing.routes) | set(routing.cascades)
        if clients & served:
            raise BackendsError(f"{sorted(clients & served)}: an alias with a served model's name")
        wanted: list[str] = list(routing.aliases.values())
        for name, chain in routing.fallbacks.items():
            wanted += [name, *chain]
        for route in routing.routes.values():
            wanted += route.models
        for cascade in routing.cascades.values():
            wanted += cascade.models
        wanted += list(routing.static_fallback)
        unknown = sorted({name for name in wanted if name not in served})
        if unknown:
            raise BackendsError(f"routing names models nothing serves: {unknown}")

    def serves(self, name: str) -> bool:
        """`name` is a served name, an alias, a routing alias or a cascade."""
        routing = self.routing
        return (
            name in self.local_names
            or name in self.by_model
            or name in routing.aliases
            or name in routing.routes
            or name in routing.cascades
        )

    def resolve(self, name: str) -> Resolved:
        """The chain of served names an alias or a served name stands for."""
        model = self.routing.aliases.get(name, name)
        return Resolved(name, (model, *self.routing.fallbacks.get(model, ())))

    def is_local(self, model: str) -> bool:
        """The in-process engine serves `model` (every name no upstream serves)."""
        return model not in self.by_model

    def price_of(self, model: str) -> ModelPrice:
        """`model`'s price: its first upstream's, else the price table's."""
        upstreams = self.by_model.get(model)
        return upstreams[0].price_of(model) if upstreams else self.pricing.price_of(model)

    def context_of(self, model: str) -> int | None:
        """The engine's context length for its own models; unknown for upstream ones."""
        return self.local_context if model in self.local_names else None

    def observe(self, record: RequestRecord) -> None:
        """A finished request: its time to first token joins its model's latency window."""
        if record.status == 200 and record.model is not None and record.ttft_s is not None:
            self.latency.observe(record.model, record.ttft_s)

    def pick(self, model: str, tried: Collection[Upstream] = ()) -> Upstream | None:
        """The available upstream serving `model` with the fewest requests in flight, one not
        in `tried` if there is one (a retry goes to another host first, as Envoy's
        `previous_hosts` retry predicate and LiteLLM's retries do); ties are broken at random,
        so that requests one at a time spread too. None if no upstream is available."""
        candidates = [u for u in self.by_model.get(model, ()) if u.available()]
        fresh = [u for u in candidates if u not in tried]
        candidates = fresh or candidates
        if not candidates:
            return None
        least = min(u.outstanding for u in candidates)
        return random.choice([u for u in candidates if u.outstanding == least])

    def client_names(self) -> list[tuple[str, str]]:
        """`(name, owner)` of every upstream model and client-side alias, for /v1/models."""
        names = [(model, upstreams[0].name) for model, upstreams in self.by_model.items()]
        routing = self.routing
        names += [(alias, "sluice") for alias in routing.aliases]
        names += [(alias, "sluice") for alias in routing.routes]
        names += [(alias, "sluice") for alias in routing.cascades]
        return names

    def start(self) -> None:
        """Start the active health checks."""
        for upstream in self.upstreams:
            if upstream.settings.health_check_interval_s is not None:
                self._tasks.append(asyncio.create_task(upstream.watch_health()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for upstream in self.upstreams:
            await upstream.aclose()

    def states(self) -> dict[str, dict[str, object]]:
        """Each upstream's breaker state, health and requests in flight (for /readyz)."""
        return {
            upstream.name: {
                "breaker": upstream.state,
                "healthy": upstream.healthy,
                "outstanding": upstream.outstanding,
            }
            for upstream in self.upstreams
        }
