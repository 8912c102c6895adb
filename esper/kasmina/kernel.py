"""The kernel Kasmina hands out: an ``nn.Module`` that runs the compiled package when the guards accept a
call, and the eager module otherwise."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from esper.guards import GuardSchema, compile_check
from esper.kasmina import telemetry
from esper.kasmina.runtime import CompiledPackage
from esper.urza import Entry

COMPILED = "compiled"
EAGER = "eager"


class Kernel(torch.nn.Module):
    """A blueprint's runtime kernel.

    ``route`` is the path it runs by default (``"compiled"`` or ``"eager"``) and ``reason`` why; after each
    call ``last_path`` says which path that call took, and ``calls`` counts both. The eager module is built
    only when a call needs it.
    """

    def __init__(
        self,
        blueprint: str,
        *,
        eager_factory: Callable[[], torch.nn.Module],
        package: CompiledPackage | None = None,
        guards: GuardSchema | None = None,
        entry: Entry | None = None,
        reason: str,
    ):
        super().__init__()
        self.blueprint = blueprint
        self.entry = entry
        self.guards = guards
        self.reason = reason
        self._package = package
        self._check = compile_check(guards) if (package is not None and guards is not None) else None
        self._eager_factory = eager_factory
        self._eager: torch.nn.Module | None = None
        self._warned: set[str] = set()
        self.last_path: str | None = None
        self.calls: Counter[str] = Counter()

    @property
    def route(self) -> str:
        return COMPILED if self._check is not None else EAGER

    def eager_module(self) -> torch.nn.Module:
        """The eager module (built on first use)."""
        if self._eager is None:
            self._eager = self._eager_factory()
        return self._eager

    def check(self, *args: Any) -> str | None:
        """Why the compiled code would refuse ``args`` (``None``: it accepts them, or there is none)."""
        return self._check(args) if self._check is not None else None

    def forward(self, *args: Any) -> Any:
        if self._check is not None:
            why = self._check(args)
            if why is None and torch.is_grad_enabled() and any(a.requires_grad for a in args):
                self._warn_once(telemetry.NEEDS_GRAD, "inputs require grad and this artifact has no backward")
            elif why is None:
                self.last_path = COMPILED
                self.calls[COMPILED] += 1
                assert self._package is not None
                return self._package([a if a.is_contiguous() else a.contiguous() for a in args])
            else:
                self._warn_once(telemetry.OUTSIDE_GUARDS, f"{why}; this call runs eager")
        self.last_path = EAGER
        self.calls[EAGER] += 1
        return self.eager_module()(*args)

    def _warn_once(self, code: str, detail: str) -> None:
        if detail not in self._warned:
            self._warned.add(detail)
            telemetry.fallback(self.blueprint, code, detail)

    def extra_repr(self) -> str:
        entry = f"entry=#{self.entry.id}, " if self.entry is not None else ""
        return f"{self.blueprint!r}, route={self.route}, {entry}reason={self.reason!r}"
