"""``telemetry.expected``: the WARNINGs a caller provokes on purpose are dropped while its block runs, and
only those."""

from __future__ import annotations

import logging

import pytest

from esper.kasmina import telemetry


def test_expected_codes_are_dropped_inside_the_block_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        with telemetry.expected(telemetry.OUTSIDE_GUARDS):
            telemetry.fallback("bp", telemetry.OUTSIDE_GUARDS, "batch 99 above 64")
            telemetry.fallback("bp", telemetry.MODE, "autocast is enabled")
        telemetry.fallback("bp", telemetry.OUTSIDE_GUARDS, "batch 99 above 64")
    reasons = [r.esper["reason"] for r in caplog.records]  # type: ignore[attr-defined]
    assert reasons == [telemetry.MODE, telemetry.OUTSIDE_GUARDS]
    assert not telemetry.log.filters


def test_the_filter_is_removed_when_the_block_raises(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(RuntimeError), telemetry.expected(telemetry.OUTSIDE_GUARDS):
        raise RuntimeError("boom")
    assert not telemetry.log.filters
