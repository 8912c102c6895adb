"""Turn a certification check's result into pytest's pass, skip or fail: the one place the generated modules
meet pytest's outcomes."""

from __future__ import annotations

import pytest

from esper.certification.results import CheckResult, Outcome

__all__ = ["verdict"]


def verdict(result: CheckResult) -> None:
    """Pass, or skip or fail the calling test with the check's own reason. A crash re-raises the check's
    exception, so pytest shows where it came from."""
    if result.error is not None:
        raise result.error
    if result.outcome is Outcome.SKIPPED:
        pytest.skip(result.reason)
    if result.outcome is Outcome.FAILED:
        pytest.fail(result.reason, pytrace=False)
