"""The gateway on the request path: keys, 401/403, rate limits, budgets, shedding, admin API.

A keys file defines the keys (digests of known secrets); the embedded store (SQLite in the
test's folder) keeps spend. Every test ends with nothing left in flight or queued.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from sluice.config import Settings
from sluice.gateway.keys import digest
from sluice.gateway.service import Gateway
from tests.api.conftest import (
    API_LIMITS,
    app_client,
    assert_error,
    assert_settled,
    chat_body,
    completion_body,
    make_settings,
)
from tests.api.test_metrics import sample
from tests.fake_engine import MODEL_ID, FakeEngine

ADMIN = "admin-secret-for-tests"


def secret(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def keys_file(tmp_path: Path, **keys: dict[str, Any]) -> Path:
    path = tmp_path / "keys.yaml"
    entries = [
        {"name": name, "secret_sha256": digest(secret(name)), **policy}
        for name, policy in keys.items()
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def gateway_settings(tmp_path: Path, keys: dict[str, dict[str, Any]], **extra: Any) -> Settings:
    gateway = {"keys_file": keys_file(tmp_path, **keys), "key_cache_s": 0, "admin_key": ADMIN}
    gateway.update(extra.pop("gateway", {}))
    return make_settings(limits=dict(API_LIMITS), gateway=gateway, **extra)


@pytest.fixture
def keyed(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    settings = gateway_settings(
        tmp_path,
        {
            "plain": {},
            "limited": {"rpm": 3},
            "tokens": {"tpm": 20},
            "budget": {"budget_tokens": 20, "budget_tokens_window": "day"},
            "capped": {"max_tokens": 4},
            "other-model": {"models": ["some-other-model"]},
            "off": {"enabled": False},
            "high": {"priority": "high"},
            "low": {"priority": "low"},
        },
    )
    with app_client(engine, settings) as client:
        yield client
        assert_settled(client, engine)
        assert_no_reservations(client)


def gateway_of(client: TestClient) -> Gateway:
    gateway: Gateway = client.app.state.gateway  # type: ignore[attr-defined]
    return gateway


def assert_no_reservations(client: TestClient) -> None:
    for name in ("plain", "limited", "tokens", "budget", "capped", "high", "low"):
        usage = client.portal.call(gateway_of(client).quota.usage, name)  # type: ignore[union-attr]
        assert usage.reserved_tokens == 0, name


def test_a_request_without_a_key_is_refused_with_401(keyed: TestClient) -> None:
    response = keyed.post("/v1/chat/completions", json=chat_body())
    error = assert_error(response, 401, code="invalid_api_key")
    assert "Authorization" in error["message"]
    assert_error(keyed.get("/v1/models"), 401, code="invalid_api_key")


def test_a_wrong_key_is_refused_and_its_secret_is_not_echoed(keyed: TestClient) -> None:
    wrong = "sk-wrong-key-that-nobody-has-0000"
    response = keyed.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {wrong}"}
    )
    error = assert_error(response, 401, code="invalid_api_key")
    assert wrong not in error["message"]
    assert "sk-wro****0000" in error["message"]


def test_a_good_key_is_served_and_named_in_metrics(keyed: TestClient) -> None:
    response = keyed.post("/v1/chat/completions", json=chat_body(), headers=auth("plain"))
    assert response.status_code == 200
    assert "x-ratelimit-limit-requests" not in response.headers  # no limits, no headers
    labels = {"model": MODEL_ID, "endpoint": "/v1/chat/completions", "status": "200"}
    assert sample(keyed, "sluice_requests_total", key="plain", **labels) == 1
    assert keyed.get("/v1/models", headers=auth("plain")).status_code == 200


def test_disabled_key_and_disallowed_model_are_403(keyed: TestClient) -> None:
    response = keyed.post("/v1/chat/completions", json=chat_body(), headers=auth("off"))
    assert_error(response, 403, code="key_disabled")
    response = keyed.post("/v1/chat/completions", json=chat_body(), headers=auth("other-model"))
    assert_error(response, 403, param="model", code="model_not_allowed")


def test_the_keys_max_tokens_cap_applies(keyed: TestClient, engine: FakeEngine) -> None:
    response = keyed.post(
        "/v1/chat/completions", json=chat_body(max_tokens=5), headers=auth("capped")
    )
    assert_error(response, 400, param="max_tokens")
    response = keyed.post("/v1/chat/completions", json=chat_body(), headers=auth("capped"))
    body = chat_body()
    del body["max_tokens"]
    response = keyed.post("/v1/chat/completions", json=body, headers=auth("capped"))
    assert response.status_code == 200
    assert engine.requests[-1].sampling_params.max_tokens == 4  # default: rest, capped


def test_rpm_admits_the_limit_then_429_with_headers(keyed: TestClient) -> None:
    for remaining in (2, 1, 0):
        response = keyed.post("/v1/completions", json=completion_body(), headers=auth("limited"))
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    response = keyed.post("/v1/completions", json=completion_body(), headers=auth("limited"))
    error = assert_error(response, 429, type_="requests", code="rate_limit_exceeded")
    assert "requests per minute" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 20
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert sample(keyed, "sluice_rejections_total", reason="rate_limit_exceeded", key="limited")


def test_tpm_reserves_the_worst_case_and_settles_to_what_was_used(keyed: TestClient) -> None:
    # 3 prompt tokens + max_tokens 10 reserves 13 of 20; the stop ends it after 2 tokens.
    body = completion_body(max_tokens=10, stop=[" two"])
    first = keyed.post("/v1/completions", json=body, headers=auth("tokens"))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "7"
    assert first.json()["usage"]["total_tokens"] == 5
    # Without the refund only 7 would be left and this 13-token reservation would fail.
    second = keyed.post("/v1/completions", json=body, headers=auth("tokens"))
    assert second.status_code == 200
    too_big = keyed.post(
        "/v1/completions", json=completion_body(max_tokens=30), headers=auth("tokens")
    )
    error = assert_error(too_big, 429, type_="tokens", code="rate_limit_exceeded")
    assert "lower max_tokens" in error["message"]


def test_a_token_budget_refuses_with_insufficient_quota(keyed: TestClient) -> None:
    # each request: 3 prompt + 3 completion = 6 tokens, reserved and then spent
    for spent in (0, 6, 12):
        response = keyed.post("/v1/completions", json=completion_body(), headers=auth("budget"))
        assert response.status_code == 200
        # the gauges, as of the reservation: spend before it and the reservation counted
        remaining = sample(keyed, "sluice_budget_remaining", key="budget", unit="tokens")
        assert remaining == 20 - spent - 6
        assert sample(keyed, "sluice_budget_limit", key="budget", unit="tokens") == 20
    response = keyed.post("/v1/completions", json=completion_body(), headers=auth("budget"))
    error = assert_error(response, 429, type_="insufficient_quota", code="insufficient_quota")
    assert "budget" in error["message"] and "day" in error["message"]
    assert int(response.headers["retry-after"]) <= 86400
    smaller = keyed.post(
        "/v1/completions", json=completion_body(max_tokens=1), headers=auth("budget")
    )
    assert_error(smaller, 429, type_="insufficient_quota", code="insufficient_quota")
    usage = keyed.get("/admin/keys/budget/usage", headers={"Authorization": f"Bearer {ADMIN}"})
    assert usage.json()["windows"]["day"]["tokens"] == 18  # 18 + 3 + 1 would pass 20


def test_streams_carry_headers_and_settle_what_they_generated(keyed: TestClient) -> None:
    response = keyed.post(
        "/v1/completions", json=completion_body(stream=True, max_tokens=3), headers=auth("tokens")
    )
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-tokens"] == "20"
    usage = keyed.get("/admin/keys/tokens/usage", headers={"Authorization": f"Bearer {ADMIN}"})
    assert usage.json()["windows"]["month"]["tokens"] == 6
    assert usage.json()["reserved"]["tokens"] == 0


def test_a_burst_of_concurrent_requests_admits_exactly_the_limit(
    engine: FakeEngine, tmp_path: Path
) -> None:
    settings = gateway_settings(tmp_path, {"burst": {"rpm": 10}})
    engine = FakeEngine(token_delay_s=0.01)
    with app_client(engine, settings) as client:
        start = threading.Barrier(40)

        def one(_: int) -> int:
            start.wait()
            response = client.post("/v1/completions", json=completion_body(), headers=auth("burst"))
            return response.status_code

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(one, range(40)))
        assert statuses.count(200) == 10
        assert statuses.count(429) == 30
        assert_settled(client, engine)


def test_priority_reaches_the_engine(keyed: TestClient, engine: FakeEngine) -> None:
    for name, rank in (("high", 0), ("plain", 1), ("low", 2)):
        assert keyed.post("/v1/completions", json=completion_body(), headers=auth(name)).is_success
        assert engine.requests[-1].priority == rank


def _hold_queue(client: TestClient, engine: FakeEngine, count: int) -> list[Any]:
    """Start `count` slow requests in threads and wait until the engine queues them."""
    pool = concurrent.futures.ThreadPoolExecutor(count)
    futures = [
        pool.submit(
            client.post,
            "/v1/completions",
            json=completion_body(max_tokens=20),
            headers=auth("high"),
        )
        for _ in range(count)
    ]
    deadline = time.monotonic() + 5
    while engine.stats().waiting < count - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.shutdown(wait=False)
    return futures


def test_shedding_by_priority_before_any_tokenising(tmp_path: Path) -> None:
    engine = FakeEngine(max_running=1, token_delay_s=0.02)
    settings = gateway_settings(
        tmp_path,
        {"high": {"priority": "high"}, "plain": {}, "low": {"priority": "low"}},
        admission={"max_waiting": 1},
    )
    with app_client(engine, settings) as client:
        held = _hold_queue(client, engine, 2)  # one running, one waiting: load 1.0
        tokenized = len(engine.requests)
        for name, priority in (("plain", "normal"), ("low", "low")):
            response = client.post("/v1/completions", json=completion_body(), headers=auth(name))
            error = assert_error(response, 503, type_="server_error", code="overloaded")
            assert f"{priority} priority" in error["message"]
            assert 1 <= int(response.headers["retry-after"]) <= 60
        assert len(engine.requests) == tokenized  # refused before planning
        high = client.post("/v1/completions", json=completion_body(), headers=auth("high"))
        assert high.status_code == 200  # high has headroom to 1.5x
        for future in held:
            assert future.result(timeout=10).status_code == 200
        assert sample(client, "sluice_rejections_total", reason="overloaded", key="low") == 1
        assert_settled(client, engine)


def test_the_gate_clamps_normal_and_sheds_low(engine: FakeEngine, tmp_path: Path) -> None:
    settings = gateway_settings(
        tmp_path,
        {"high": {"priority": "high"}, "plain": {}, "low": {"priority": "low"}},
        admission={"gate_tokens_per_min": 5, "gate_max_tokens": 2},
    )
    with app_client(engine, settings) as client:
        for _ in range(2):  # 6 tokens generated in the last minute: over 5
            client.post("/v1/completions", json=completion_body(), headers=auth("high"))
        normal = client.post("/v1/completions", json=completion_body(), headers=auth("plain"))
        assert normal.json()["usage"]["completion_tokens"] == 2
        low = client.post("/v1/completions", json=completion_body(), headers=auth("low"))
        assert_error(low, 503, type_="server_error", code="overloaded")
        high = client.post("/v1/completions", json=completion_body(), headers=auth("high"))
        assert high.json()["usage"]["completion_tokens"] == 3


def test_a_usd_budget_uses_the_price_table(engine: FakeEngine, tmp_path: Path) -> None:
    settings = gateway_settings(
        tmp_path,
        {"spender": {"budget_usd": 0.02, "budget_usd_window": "hour"}},
        pricing={"default": {"input_usd_per_mtok": 1000, "output_usd_per_mtok": 2000}},
    )
    with app_client(engine, settings) as client:
        # reserve 3 * $0.001 + 3 * $0.002 = $0.009 each: two fit in $0.02, the third not
        for _ in range(2):
            ok = client.post("/v1/completions", json=completion_body(), headers=auth("spender"))
            assert ok.status_code == 200
        refused = client.post("/v1/completions", json=completion_body(), headers=auth("spender"))
        error = assert_error(refused, 429, type_="insufficient_quota", code="insufficient_quota")
        assert "USD" in error["message"] and "hour" in error["message"]
        cost = sample(client, "sluice_cost_usd_total", model=MODEL_ID, key="spender")
        assert cost == pytest.approx(0.018)
        left = sample(client, "sluice_budget_remaining", key="spender", unit="usd")
        assert left == pytest.approx(0.02 - 0.009 - 0.009)  # as of the second reservation
        assert sample(client, "sluice_budget_remaining", key="spender", unit="tokens") is None


def test_redis_down_fails_open_or_closed(tmp_path: Path) -> None:
    dead = "redis://127.0.0.1:9/0"  # the discard port: nothing answers
    for mode, status in (("open", 200), ("closed", 503)):
        engine = FakeEngine()
        settings = gateway_settings(
            tmp_path,
            {"limited": {"rpm": 2}},
            gateway={"store": "redis", "redis_url": dead, "redis_failure": mode},
        )
        with app_client(engine, settings) as client:
            started = time.monotonic()
            response = client.post(
                "/v1/completions", json=completion_body(), headers=auth("limited")
            )
            assert time.monotonic() - started < 3  # bounded, never hangs
            assert response.status_code == status, response.text
            failures = sample(client, "sluice_store_failures_total", operation="reserve")
            assert failures is not None and failures >= 1
            if mode == "open":  # local limits still hold
                client.post("/v1/completions", json=completion_body(), headers=auth("limited"))
                third = client.post(
                    "/v1/completions", json=completion_body(), headers=auth("limited")
                )
                assert_error(third, 429, type_="requests", code="rate_limit_exceeded")
            else:
                assert_error(response, 503, type_="server_error", code="store_unavailable")
                assert response.headers["retry-after"] == "5"
            assert_settled(client, engine)


# -- admin API ----------------------------------------------------------------------------

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_admin_api_needs_the_admin_key(keyed: TestClient) -> None:
    assert_error(keyed.get("/admin/keys"), 401, code="invalid_api_key")
    assert_error(keyed.get("/admin/keys", headers=auth("plain")), 401, code="invalid_api_key")
    with app_client(FakeEngine(), make_settings()) as open_server:
        assert_error(open_server.get("/admin/keys"), 403, code="admin_disabled")


def test_admin_creates_lists_revokes_and_reports_keys(keyed: TestClient) -> None:
    created = keyed.post("/admin/keys", json={"name": "new", "rpm": 5}, headers=ADMIN_AUTH)
    assert created.status_code == 201
    new_secret = created.json()["secret"]
    assert new_secret.startswith("sk-sluice-")
    headers = {"Authorization": f"Bearer {new_secret}"}
    assert keyed.post("/v1/completions", json=completion_body(), headers=headers).is_success
    listed = keyed.get("/admin/keys", headers=ADMIN_AUTH).json()["data"]
    assert {k["name"] for k in listed} >= {"new", "plain"}
    assert all("secret" not in k and "secret_sha256" not in k for k in listed)
    usage = keyed.get("/admin/keys/new/usage", headers=ADMIN_AUTH).json()
    assert usage["windows"]["hour"]["tokens"] == 6
    again = keyed.post("/admin/keys", json={"name": "new"}, headers=ADMIN_AUTH)
    assert_error(again, 409, param="name", code="conflict")
    file_key = keyed.delete("/admin/keys/plain", headers=ADMIN_AUTH)
    assert_error(file_key, 409, param="name", code="conflict")
    assert keyed.delete("/admin/keys/new", headers=ADMIN_AUTH).status_code == 200
    refused = keyed.post("/v1/completions", json=completion_body(), headers=headers)
    assert_error(refused, 401, code="invalid_api_key")
    gone = keyed.delete("/admin/keys/new", headers=ADMIN_AUTH)
    assert_error(gone, 404, param="name", code="not_found")
    bad = keyed.post("/admin/keys", json={"name": "bad name!"}, headers=ADMIN_AUTH)
    assert_error(bad, 400, param="name")


def test_admin_updates_rotates_and_audits_keys(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.audit")
    created = keyed.post("/admin/keys", json={"name": "svc", "rpm": 5}, headers=ADMIN_AUTH)
    old_secret = created.json()["secret"]
    old = {"Authorization": f"Bearer {old_secret}"}
    assert keyed.post("/v1/completions", json=completion_body(), headers=old).is_success
    # in place: the same secret, the new policy at once; null clears a limit
    changed = keyed.patch(
        "/admin/keys/svc", json={"rpm": None, "max_concurrent": 2}, headers=ADMIN_AUTH
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["rpm"], changed.json()["max_concurrent"]) == (None, 2)
    assert keyed.post("/v1/completions", json=completion_body(), headers=old).is_success
    assert (
        "x-ratelimit-limit-requests"
        not in keyed.post("/v1/completions", json=completion_body(), headers=old).headers
    )
    bad = keyed.patch("/admin/keys/svc", json={"rpm": -1}, headers=ADMIN_AUTH)
    assert_error(bad, 400, param="rpm")
    renamed = keyed.patch("/admin/keys/svc", json={"name": "x"}, headers=ADMIN_AUTH)
    assert_error(renamed, 400, param="name")
    in_file = keyed.patch("/admin/keys/plain", json={}, headers=ADMIN_AUTH)
    assert_error(in_file, 409, param="name", code="conflict")
    unknown = keyed.patch("/admin/keys/nobody", json={}, headers=ADMIN_AUTH)
    assert_error(unknown, 404, param="name", code="not_found")
    # rotation: a new secret; the old one works through its grace period
    rotated = keyed.post("/admin/keys/svc/rotate", json={"grace_s": 3600}, headers=ADMIN_AUTH)
    assert rotated.status_code == 200
    new = {"Authorization": f"Bearer {rotated.json()['secret']}"}
    for headers in (old, new):
        assert keyed.post("/v1/completions", json=completion_body(), headers=headers).is_success
    ended = keyed.post("/admin/keys/svc/rotate", json={"grace_s": 0}, headers=ADMIN_AUTH)
    newest = {"Authorization": f"Bearer {ended.json()['secret']}"}
    gone = keyed.post("/v1/completions", json=completion_body(), headers=new)
    assert_error(gone, 401, code="invalid_api_key")  # grace 0: the previous secret ends
    assert keyed.post("/v1/completions", json=completion_body(), headers=newest).is_success
    usage = keyed.get("/admin/keys/svc/usage", headers=ADMIN_AUTH).json()
    assert usage["windows"]["hour"]["tokens"] == 6 * 6  # one key: its spend survived it all
    lines = [r for r in caplog.records if r.name == "sluice.audit"]
    audit = [(r.action, r.key, r.actor) for r in lines]  # type: ignore[attr-defined]
    assert audit == [
        ("create", "svc", "admin-api:testclient"),
        ("update", "svc", "admin-api:testclient"),
        ("rotate", "svc", "admin-api:testclient"),
        ("rotate", "svc", "admin-api:testclient"),
    ]
    update = lines[1]
    assert update.before["rpm"] == 5 and update.after["rpm"] is None  # type: ignore[attr-defined]
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert old_secret not in logged and "secret_sha256" not in logged


def test_admin_refuses_infinite_budgets_and_grace_periods(keyed: TestClient) -> None:
    """JSON's 1e999 is infinity, which a stored key would keep as null: a budget or a grace
    period's end would silently vanish."""
    json_headers = {**ADMIN_AUTH, "content-type": "application/json"}
    created = keyed.post(
        "/admin/keys", content='{"name": "inf", "budget_usd": 1e999}', headers=json_headers
    )
    assert_error(created, 400, param="budget_usd")
    assert keyed.post("/admin/keys", json={"name": "fin"}, headers=ADMIN_AUTH).status_code == 201
    patched = keyed.patch("/admin/keys/fin", content='{"budget_usd": 1e999}', headers=json_headers)
    assert_error(patched, 400, param="budget_usd")
    for grace in ("1e999", "1e300"):
        rotated = keyed.post(
            "/admin/keys/fin/rotate", content=f'{{"grace_s": {grace}}}', headers=json_headers
        )
        assert_error(rotated, 400, param="grace_s")
    listed = {k["name"]: k for k in keyed.get("/admin/keys", headers=ADMIN_AUTH).json()["data"]}
    assert "inf" not in listed and listed["fin"]["budget_usd"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpm", True),  # pydantic's lax mode would take true as 1
        ("rpm", "5"),
        ("rpm", 5.0),
        ("tpm", 10**30),  # past 2^53: Redis's Lua holds numbers as doubles
        ("max_concurrent", 2**53 + 1),
        ("budget_tokens", 0),
        ("budget_usd", True),
        ("budget_usd", "1e300"),
        ("budget_usd", 1e300),
        ("enabled", "off"),
        ("enabled", 0),
        ("models", [""]),
        ("models", [" spaced "]),
        ("models", "one-model"),
    ],
)
def test_admin_refuses_values_of_the_wrong_type_or_range(
    keyed: TestClient, field: str, value: Any
) -> None:
    """A policy value is JSON's own type within the range the stores hold exactly: never
    coerced (true, "5", 5.0), never stored past what Redis and SQLite count exactly."""
    param = field
    created = keyed.post("/admin/keys", json={"name": "typed", field: value}, headers=ADMIN_AUTH)
    assert_error(created, 400, param=param)
    assert keyed.post("/admin/keys", json={"name": "typed"}, headers=ADMIN_AUTH).status_code == 201
    patched = keyed.patch("/admin/keys/typed", json={field: value}, headers=ADMIN_AUTH)
    assert_error(patched, 400, param=param)
    rotated = keyed.post("/admin/keys/typed/rotate", json={"grace_s": True}, headers=ADMIN_AUTH)
    assert_error(rotated, 400, param="grace_s")
    listed = {k["name"]: k for k in keyed.get("/admin/keys", headers=ADMIN_AUTH).json()["data"]}
    assert listed["typed"][field] == (True if field == "enabled" else None)


def test_admin_keeps_what_a_policy_means(keyed: TestClient) -> None:
    """Epoch seconds for `expires_at` are seconds; a key that has already expired is not
    created; each allowed model is listed once."""
    later = keyed.post(
        "/admin/keys",
        json={"name": "epoch", "expires_at": 32503680000, "models": ["a", "b", "a"]},
        headers=ADMIN_AUTH,
    )
    assert later.status_code == 201, later.text
    assert later.json()["expires_at"].startswith("3000-01-01")
    assert later.json()["models"] == ["a", "b"]
    past = keyed.post(
        "/admin/keys",
        json={"name": "past", "expires_at": "2020-01-01T00:00:00Z"},
        headers=ADMIN_AUTH,
    )
    assert_error(past, 400, param="expires_at")


def test_max_concurrent_refuses_the_request_past_the_cap(
    engine_slow_keep_alive: FakeEngine, tmp_path: Path
) -> None:
    settings = gateway_settings(tmp_path, {"one": {"max_concurrent": 1}})
    with app_client(engine_slow_keep_alive, settings) as client:
        with client.stream(
            "POST",
            "/v1/completions",
            json=completion_body(stream=True, max_tokens=2),
            headers=auth("one"),
        ) as first:
            assert first.status_code == 200
            second = client.post("/v1/completions", json=completion_body(), headers=auth("one"))
            error = assert_error(second, 429, type_="requests", code="concurrency_limit_exceeded")
            assert "limit 1 in flight" in error["message"]
            assert second.headers["retry-after"] == "1"
            first.read()
        assert client.post(
            "/v1/completions", json=completion_body(), headers=auth("one")
        ).is_success


def test_creating_the_first_key_turns_authentication_on(engine: FakeEngine) -> None:
    settings = make_settings(gateway={"admin_key": ADMIN, "key_cache_s": 0})
    with app_client(engine, settings) as client:
        assert client.post("/v1/completions", json=completion_body()).status_code == 200
        created = client.post("/admin/keys", json={"name": "first"}, headers=ADMIN_AUTH)
        assert created.status_code == 201
        refused = client.post("/v1/completions", json=completion_body())
        assert_error(refused, 401, code="invalid_api_key")
        headers = {"Authorization": f"Bearer {created.json()['secret']}"}
        assert client.post("/v1/completions", json=completion_body(), headers=headers).is_success
