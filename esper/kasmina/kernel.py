"""The kernel Kasmina hands out: an ``nn.Module`` that sends each call to the certified route whose guards
accept it (compiled code, or eager where certification measured eager to be faster), and to the eager
module when no route accepts it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esper.guards import compile_check, compile_predicate
from esper.kasmina import telemetry
from esper.kasmina.runtime import CompiledPackage
from esper.urza import Entry

COMPILED = "compiled"
EAGER = "eager"


@dataclass(frozen=True)
class Route:
    """One certified entry: its guard check and, unless certification chose eager for it, its package."""

    entry: Entry
    check: Callable[[Sequence[Any]], str | None]
    package: CompiledPackage | None = None
    accepts: Callable[[Sequence[Any]], bool] | None = None

    @classmethod
    def of(cls, entry: Entry, package: CompiledPackage | None) -> Route:
        assert entry.guards is not None
        return cls(entry, compile_check(entry.guards), package, compile_predicate(entry.guards))

    @property
    def path(self) -> str:
        return COMPILED if self.package is not None else EAGER


class Kernel(torch.nn.Module):
    """A blueprint's runtime kernel.

    ``route`` is ``"compiled"`` when at least one compiled route is loaded, and ``reason`` says why (or why
    not). After each call ``last_path`` says which path that call took and ``calls`` counts both. Routes
    come from disjoint shape profiles, so at most one accepts a call: dispatch is the first that does. The
    eager module is built only when a call needs it. ``last_path`` and ``calls`` are unsynchronized
    diagnostics: with several threads calling one kernel they describe some recent call, not yours.
    """

    def __init__(
        self,
        blueprint: str,
        *,
        eager_factory: Callable[[], torch.nn.Module],
        routes: Sequence[Route] = (),
        reason: str,
    ):
        super().__init__()
        self.blueprint = blueprint
        self.routes = tuple(routes)
        self.reason = reason
        self._eager_factory = eager_factory
        self._eager: torch.nn.Module | None = None
        self._warned: set[str] = set()
        self.last_path: str | None = None
        self.calls: Counter[str] = Counter()

    @property
    def route(self) -> str:
        return COMPILED if any(r.package is not None for r in self.routes) else EAGER

    @property
    def entry(self) -> Entry | None:
        """The first compiled route's entry (``None`` when nothing compiled is loaded)."""
        return next((r.entry for r in self.routes if r.package is not None), None)

    def eager_module(self) -> torch.nn.Module:
        """The eager module (built on first use)."""
        if self._eager is None:
            self._eager = self._eager_factory()
        return self._eager

    def select(self, args: Sequence[Any]) -> tuple[Route | None, str | None]:
        """The route that accepts ``args``, or ``None`` and why none does."""
        # Refusals are explained only once no route accepts: a call to the second bucket pays two predicates.
        for r in self.routes:
            if r.accepts is not None and r.accepts(args):
                return r, None
        why = None
        for r in self.routes:
            why = r.check(args)
            if why is None:
                return r, None
        if len(self.routes) > 1:
            why = f"no certified shape profile accepts the inputs (last refusal: {why})"
        return None, why

    def check(self, *args: Any) -> str | None:
        """Why no route would accept ``args`` (``None``: one does)."""
        return self.select(args)[1] if self.routes else "no certified route"

    def forward(self, *args: Any) -> Any:
        if self.routes:
            route, why = self.select(args)
            if route is not None and route.package is not None:
                if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                    self._warn_once(telemetry.NEEDS_GRAD, "inputs require grad and this artifact has no backward")
                else:
                    self.last_path = COMPILED
                    self.calls[COMPILED] += 1
                    return route.package([a if a.is_contiguous() else a.contiguous() for a in args])
            elif why is not None:
                self._warn_once(telemetry.OUTSIDE_GUARDS, f"{why}; this call runs eager")
        self.last_path = EAGER
        self.calls[EAGER] += 1
        return self.eager_module()(*args)

    def bind(self, weights: Any) -> Kernel:
        """This kernel's compiled code with a seed's own weights (its module, or a state dict): a new kernel.
        Names, shapes and dtypes are checked first; see :mod:`esper.kasmina.seeds`."""
        from esper.kasmina.seeds import bind

        return bind(self, weights)

    def _warn_once(self, code: str, detail: str) -> None:
        # One WARNING per kind of refusal, not per size: a loop over out-of-range batches must not flood logs.
        kind = re.sub(r"\d+", "N", detail)
        if kind not in self._warned:
            self._warned.add(kind)
            telemetry.fallback(self.blueprint, code, detail)

    def extra_repr(self) -> str:
        routes = ", ".join(f"{r.entry.profile}/{r.entry.variant}->{r.path}#{r.entry.id}" for r in self.routes)
        return f"{self.blueprint!r}, route={self.route}, routes=[{routes}], reason={self.reason!r}"
