"""`Gateway`: a reservation nobody settles stops counting after the request's time limit."""

from __future__ import annotations

from sluice.config import AdmissionSettings, GatewaySettings, PricingSettings
from sluice.gateway.admission import Admission
from sluice.gateway.auth import KeyRing, Principal
from sluice.gateway.keys import KeyPolicy
from sluice.gateway.quota import RESERVATION_GRACE_S
from sluice.gateway.service import Gateway
from sluice.gateway.store_local import LocalQuota, MemoryLedger
from tests.conftest import FakeClock
from tests.unit.test_auth import MemoryKeyStore


async def test_an_unsettled_reservation_expires_after_the_request_time_limit(
    clock: FakeClock,
) -> None:
    quota = LocalQuota(MemoryLedger(), clock=clock)
    gateway = Gateway(
        GatewaySettings(),
        PricingSettings(),
        KeyRing({}, MemoryKeyStore(), 0.0),
        quota,
        Admission(AdmissionSettings(), lambda: None),
        request_timeout_s=30.0,
    )
    principal = Principal("k", KeyPolicy(name="k", budget_tokens=1000))
    await gateway.reserve(principal, "m", prompt_tokens=10, max_output_tokens=90)
    assert (await quota.usage("k")).reserved_tokens == 100
    clock.advance(30.0 + RESERVATION_GRACE_S - 1)
    assert (await quota.usage("k")).reserved_tokens == 100
    clock.advance(1)
    assert (await quota.usage("k")).reserved_tokens == 0
