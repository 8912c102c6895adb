"""What a certification check returns: a typed result that any driver (the pytest plugin, ``esper certify``, a
notebook) turns into its own form of pass, skip or fail.

A check is a method of :class:`~esper.certification.run.Certification` wrapped by :func:`check`. Inside it,
:class:`Skip` and :class:`Fail` end the check early; nothing else crosses the layer: the wrapper turns them,
and any other exception (a crash), into a :class:`CheckResult`, records it on the certification, and returns
it. The stored reason is Esper's own text, never a test framework's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, Protocol

__all__ = [
    "CANDIDATE_CHECKS",
    "Check",
    "CheckFailure",
    "CheckResult",
    "Fail",
    "Outcome",
    "Skip",
    "check",
]


class Outcome(StrEnum):
    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def rank(self) -> int:
        """How bad: a check with several results (one per case or shape) keeps its worst."""
        return list(Outcome).index(self)


class Check(StrEnum):
    """The checks, in the order a blueprint's certification runs them."""

    COMPILE = "compile"
    PARITY = "parity"
    CONTRACT = "contract"
    WEIGHTS = "weights"
    REPEATED = "repeated"
    GUARDS = "guards"
    LATENCY = "latency"
    REGIONS = "regions"
    SELECT = "select"
    BUDGETS = "budgets"
    PUBLISH = "publish"

    @property
    def times(self) -> bool:
        """Whether this check times the compiled code against eager (it then needs the machine quiet)."""
        return self in (Check.LATENCY, Check.REGIONS)


# The checks every candidate must pass before selection may route it. ``regions`` is not among them: a session
# that did not measure a candidate's grid routes its profile by the representative shapes alone; one that
# measured it and failed rejects the candidate (see Certification.record).
CANDIDATE_CHECKS = (
    Check.COMPILE,
    Check.PARITY,
    Check.CONTRACT,
    Check.WEIGHTS,
    Check.REPEATED,
    Check.GUARDS,
    Check.LATENCY,
)


@dataclass(frozen=True)
class CheckResult:
    """One check's result. ``candidate`` is ``None`` for a blueprint-wide check (select, budgets, publish);
    ``figures`` are what the check measured, as plain values; ``error`` is the exception of a crash, kept so
    that a driver can show its traceback."""

    check: Check
    outcome: Outcome
    reason: str = ""
    candidate: str | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)
    error: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    def raise_for_outcome(self) -> CheckResult:
        """This result, or :class:`CheckFailure` when it failed (a skip is not an error)."""
        if self.failed:
            raise CheckFailure(self)
        return self


class CheckFailure(Exception):
    """A failed :class:`CheckResult`, raised for a caller that wants an exception (e.g. inside hypothesis)."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__(f"{result.check} failed: {result.reason}")
        self.result = result


class Skip(Exception):
    """Ends a check: there is nothing to check, and the reason says why."""


class Fail(Exception):
    """Ends a check: the candidate (or the blueprint) failed it, and the reason says how."""


class Recorder(Protocol):
    def begin(self, check: Check) -> None: ...

    def record(self, result: CheckResult) -> None: ...


P = ParamSpec("P")


def crash_reason(error: BaseException) -> str:
    """An exception's type and message, as a traceback's last line shows them."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def check(
    name: Check, *, per_candidate: bool = True
) -> Callable[[Callable[Concatenate[Any, P], Mapping[str, Any] | None]], Callable[Concatenate[Any, P], CheckResult]]:
    """Make a method returning its figures (or ``None``) into a check returning a recorded :class:`CheckResult`.

    With ``per_candidate``, the method's first argument is the candidate's id."""

    def wrap(
        method: Callable[Concatenate[Any, P], Mapping[str, Any] | None],
    ) -> Callable[Concatenate[Any, P], CheckResult]:
        @functools.wraps(method)
        def run(self: Recorder, *args: P.args, **kwargs: P.kwargs) -> CheckResult:
            candidate = (args[0] if args else kwargs.get("candidate")) if per_candidate else None
            try:
                self.begin(name)
                figures = method(self, *args, **kwargs)
            except Skip as e:
                result = CheckResult(name, Outcome.SKIPPED, str(e), candidate)  # type: ignore[arg-type]
            except Fail as e:
                result = CheckResult(name, Outcome.FAILED, str(e), candidate)  # type: ignore[arg-type]
            except Exception as e:
                result = CheckResult(name, Outcome.FAILED, crash_reason(e), candidate, error=e)  # type: ignore[arg-type]
            else:
                result = CheckResult(name, Outcome.PASSED, "", candidate, dict(figures or {}))  # type: ignore[arg-type]
            self.record(result)
            return result

        return run

    return wrap
