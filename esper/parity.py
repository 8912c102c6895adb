"""Compiled-vs-eager numeric comparison: error figures, and the assertion certification makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def max_errors(got: Any, want: Any) -> tuple[float, float]:
    """Largest absolute and relative error over every tensor of two (nested) outputs."""
    abs_err = rel_err = 0.0
    for g, w in zip(_leaves(got), _leaves(want), strict=True):
        if g.numel() == 0:
            continue
        diff = (g.detach().double() - w.detach().double()).abs()
        finite = torch.isfinite(diff)
        if finite.any():
            abs_err = max(abs_err, float(diff[finite].max()))
            rel = diff[finite] / w.detach().double().abs()[finite].clamp_min(torch.finfo(torch.float32).tiny)
            rel_err = max(rel_err, float(rel.max()))
    return abs_err, rel_err


@dataclass
class ParityStats:
    """Running totals over the cases a certification compared."""

    cases: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0

    def add(self, abs_err: float, rel_err: float) -> None:
        self.cases += 1
        self.max_abs = max(self.max_abs, abs_err)
        self.max_rel = max(self.max_rel, rel_err)


def assert_parity(got: Any, want: Any, *, atol: float, rtol: float, context: str) -> None:
    """``torch.testing.assert_close`` over every output tensor, naming the case that failed."""
    got_l, want_l = _leaves(got), _leaves(want)
    if len(got_l) != len(want_l):
        raise AssertionError(f"{context}: compiled returned {len(got_l)} tensors, eager {len(want_l)}")
    for k, (g, w) in enumerate(zip(got_l, want_l, strict=True)):
        torch.testing.assert_close(
            g, w, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m, k=k: f"{context}, output {k}: {m}"
        )
