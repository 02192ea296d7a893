"""`Upstream`: one OpenAI-compatible server sluice forwards requests to.

It owns the HTTP client (an aiohttp session, one connection pool per upstream, made in the
event loop on first use), the names it serves and
their mapping to the upstream's own names, its prices, its concurrency cap, its health
(active checks: `GET {base_url}/models` every `health_check_interval_s`) and its circuit
breaker (the `circuitbreaker` library: `breaker_failures` consecutive failures open it; after
`breaker_recovery_s` it is half-open and one request at a time probes it; a success closes
it, a failure opens it again).

What counts as a failure (`UpstreamFailure`, `retryable`): a connection error, a timeout, a
5xx (or a 5xx-like error event in a stream), a 429 or a stream cut short. A 4xx is the
request's own fault: the upstream answered, which counts as a success for the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker

from sluice.config import BackendSettings, ModelPrice, PricingSettings

logger = logging.getLogger(__name__)

# The breaker's state as a number, for the `sluice_circuit_breaker_state` gauge.
BREAKER_STATES = {STATE_CLOSED: 0, STATE_OPEN: 1, STATE_HALF_OPEN: 2}


class UpstreamFailure(Exception):
    """An attempt on an upstream failed in a way another backend (or a later retry) may not.

    `reason` is bounded (a metric label): `connect`, `timeout` (also the upstream's own 408),
    `status_5xx`, `status_429`, `status_503`, `status_4xx` (401, 403, 404, 409: sluice's
    credentials, its model mapping or the upstream's state refused, not the request),
    `stream_cut`, `bad_answer` (a 200 that is not JSON or SSE, or broken event data).
    `status`, `body` and `retry_after_s` are the upstream's
    answer, where there was one."""

    def __init__(
        self,
        backend: str,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        body: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.reason = reason
        self.message = message
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s


UPSTREAM_4XX = frozenset({401, 403, 404, 409})  # the upstream's or sluice's fault, not the body's
MAX_RETRY_AFTER_S = 86_400.0  # an upstream's Retry-After passed on; past a day, dropped
MAX_LISTING_BYTES = 1 << 20  # of a health check's `GET /models` answer read


def failure_of_status(
    backend: str, status: int, body: dict[str, Any] | None, headers: Mapping[str, str]
) -> UpstreamFailure | None:
    """The failure an upstream's error status is, or None for the request's own fault (400,
    413, 422 and the other 4xx: not retried, the client's error).

    Failures, retried and failed over like a dead upstream: 429 and 5xx; 408 (the upstream
    or its load balancer timed the request out: `timeout`); 401 and 403 (sluice's own
    credentials refused), 404 (sluice's model mapping or route is not served there) and 409
    (the upstream's state): `status_4xx`, since another upstream may well serve the same
    body. The OpenAI SDK retries 408, 409, 429 and 5xx; LiteLLM's router cools a deployment
    down on 401, 404, 408, 429 and 5xx."""
    if status in UPSTREAM_4XX:
        reason = "status_4xx"
    elif status == 408:
        reason = "timeout"
    elif status == 429:
        reason = "status_429"
    elif status >= 500:
        reason = "status_503" if status == 503 else "status_5xx"
    else:
        return None
    retry_after: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(headers.get("retry-after", ""))
    if retry_after is not None and not 0 <= retry_after <= MAX_RETRY_AFTER_S:  # nan too
        retry_after = None
    message = message_of(body) or f"HTTP {status}"
    return UpstreamFailure(
        backend, reason, message, status=status, body=body, retry_after_s=retry_after
    )


MAX_MESSAGE_CHARS = 1000  # of an upstream's error message quoted to the client


def message_of(body: dict[str, Any] | None) -> str | None:
    """The message of an upstream's error body, whatever its shape: OpenAI's
    `{"error": {"message"}}`, `{"error": "text"}` (Hugging Face TGI), FastAPI's
    `{"detail": ...}` (vLLM's own server for some errors), or a top-level `message`."""
    body = body or {}
    error = body.get("error")
    if isinstance(error, dict):
        found: Any = error.get("message")
    elif error is not None:
        found = error
    else:
        found = body.get("detail", body.get("message"))
    if found is None or found == "":
        return None
    text = found if isinstance(found, str) else json.dumps(found, default=str)
    return text[:MAX_MESSAGE_CHARS]


class Upstream:
    """One upstream server (module docstring). `outstanding` counts requests in flight to
    it (the least-outstanding balancer reads it)."""

    def __init__(
        self,
        settings: BackendSettings,
        pricing: PricingSettings,
        *,
        breaker_failures: int = 5,
        breaker_recovery_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.models = dict(settings.models)
        self._pricing = pricing
        self.headers: dict[str, str] = {}
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ValueError(
                    f"backend {settings.name}: the environment variable "
                    f"{settings.api_key_env} (its API key) is not set"
                )
            self.headers["authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures,
            recovery_timeout=breaker_recovery_s,
            expected_exception=UpstreamFailure,
            name=settings.name,
        )
        self.outstanding = 0
        self.healthy = True
        self._probing = False  # a half-open probe is under way

    @property
    def session(self) -> aiohttp.ClientSession:
        """The upstream's connection pool, made on first use, inside the event loop as
        aiohttp wants. Not capped: `max_concurrent` is enforced by `available` (a pool limit
        would also make the health check queue behind busy requests and fail)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=self.settings.timeouts.connect_s,
                    sock_read=self.settings.timeouts.first_token_s,
                    ceil_threshold=math.inf,  # exact limits (aiohttp rounds up from 5 s)
                ),
                auto_decompress=True,
            )
        return self._session

    def url(self, path: str) -> str:
        """`path` (`/chat/completions`) under the upstream's base URL."""
        return self.settings.base_url + path

    def price_of(self, model: str) -> ModelPrice:
        """The price of `model` (a served name) on this upstream: its own, else the table's."""
        return self.settings.pricing.get(model) or self._pricing.price_of(model)

    @property
    def state(self) -> str:
        """The breaker's state: `closed`, `open` or `half_open`."""
        return str(self.breaker.state)

    def available(self) -> bool:
        """Healthy, under its concurrency cap, and its breaker lets a request through (in
        half-open: one probe at a time)."""
        if not self.healthy:
            return False
        cap = self.settings.max_concurrent
        if cap is not None and self.outstanding >= cap:
            return False
        state = self.state
        if state == STATE_OPEN:
            return False
        return not (state == STATE_HALF_OPEN and self._probing)

    def begin(self) -> bool:
        """Count a request in; True if it is the half-open probe."""
        self.outstanding += 1
        probe = bool(self.state == STATE_HALF_OPEN)
        if probe:
            self._probing = True
        return probe

    def end(self, probe: bool) -> None:
        """Count a request out (after `begin`)."""
        self.outstanding -= 1
        if probe:
            self._probing = False

    def succeeded(self) -> None:
        """The upstream answered: the breaker closes (and forgets earlier failures)."""
        with self.breaker:
            pass

    def failed(self, failure: UpstreamFailure) -> None:
        """Count `failure` against the breaker."""
        with contextlib.suppress(UpstreamFailure), self.breaker:
            raise failure

    async def check_health(self) -> bool:
        """`GET /models`: the upstream answers 200 within `connect_s` (a listing is quick;
        a stalled upstream must not pass for healthy for a whole `first_token_s`). Marks
        `healthy`; logs a change."""
        try:
            async with self.session.get(
                self.url("/models"),
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.timeouts.connect_s, ceil_threshold=math.inf
                ),
                allow_redirects=False,
            ) as response:
                await read_capped(response.content, MAX_LISTING_BYTES, cut=True)
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        except Exception:  # whatever it was, the upstream did not answer as it should
            logger.warning("backend %s: health check failed", self.name, exc_info=True)
            healthy = False
        if healthy != self.healthy:
            logger.warning("backend %s is %s", self.name, "up" if healthy else "down")
        self.healthy = healthy
        return healthy

    async def watch_health(self) -> None:
        """Check health every `health_check_interval_s` until cancelled."""
        interval = self.settings.health_check_interval_s
        if interval is None:
            return
        while True:
            await self.check_health()
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def read_capped(content: aiohttp.StreamReader, limit: int, cut: bool = False) -> bytes:
    """A response body, read to its end as it arrives, at most `limit` bytes (after
    decompression): past it, ValueError, or with `cut` the first `limit` bytes (an error
    answer, only its message is wanted)."""
    body = bytearray()
    async for data in content.iter_any():
        body += data
        if len(body) > limit:
            if cut:
                return bytes(body[:limit])
            raise ValueError(f"the answer is longer than {limit} bytes")
    return bytes(body)
