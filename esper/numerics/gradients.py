"""One training step's gradients: what Tezzeret, certification, tests and benchmarks compare and time.

A step is the forward plus the backward of a fixed upstream gradient (drawn from a seed), taken with
``torch.autograd.grad`` so that nothing accumulates into ``.grad`` between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from esper.numerics.parity import float64_copy, to_float64


def _differentiable(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]


def upstream(outputs: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """A standard-normal upstream gradient for each output, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float32).to(o.dtype).to(o.device) for o in outputs]


def gradients(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    *,
    seed: int = 0,
    weights: torch.nn.Module | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``module`` on copies of ``args`` that require grad, backpropagate an upstream gradient drawn from
    ``seed``, and return the output and the gradients: ``"input k"`` for each floating input and each
    trainable parameter of ``weights`` (default ``module``; a kernel's ``seed``) by name, zeros where the
    graph does not reach it."""
    inputs = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    params = [(n, p) for n, p in (weights or module).named_parameters() if p.requires_grad]
    out = module(*inputs)
    flat = _differentiable(out)
    wrt = [x for x in inputs if x.requires_grad] + [p for _, p in params]
    names = [f"input {k}" for k, x in enumerate(inputs) if x.requires_grad] + [n for n, _ in params]
    grads = torch.autograd.grad(flat, wrt, upstream(flat, seed), allow_unused=True)
    return out, {n: g if g is not None else torch.zeros_like(w) for n, g, w in zip(names, grads, wrt, strict=True)}


def step(module: torch.nn.Module, args: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]) -> None:
    """One forward and backward of ``module`` (for timing): ``args`` should already require grad."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    flat = _differentiable(module(*args))
    torch.autograd.grad(flat, [*(a for a in args if a.requires_grad), *trainable], grad_outputs, allow_unused=True)


# How many times eager's own float32 error a compiled result may show (see :func:`tolerance`). Measured: a
# BatchNorm seed fed 1e-3-scale inputs has a bias gradient that is exactly zero in float64 and rounding noise
# in float32, ~8x larger in compiled than in eager code (another summation order); a wrong gradient is off by
# the gradient's own magnitude, orders of magnitude more.
SLACK = 32.0


def exact_gradients(
    module: torch.nn.Module, args: Sequence[torch.Tensor], *, seed: int = 0
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The same step in float64, on a copy of ``module``: the yardstick for float32 rounding."""
    return gradients(float64_copy(module), to_float64(args), seed=seed)


def tolerance(atol: float, rtol: float, eager: Any, exact: Any) -> tuple[float, float]:
    """The (atol, rtol) a compiled output or gradient is compared with eager's at: the blueprint's tolerance,
    atol widened by :data:`SLACK` times eager's own largest float32 error against the float64 ``exact``.

    A weight's gradient sums over the batch, and a normalisation subtracts a mean: where large terms cancel,
    float32 keeps their rounding, and no fixed tolerance tells that apart from a wrong result. "No worse
    than eager, within a small factor" does.
    """
    return atol + SLACK * _max_abs_error(eager, exact), rtol


def _max_abs_error(got: Any, want: Any) -> float:
    """The largest |got - want| over the finite elements of every tensor of two (nested) outputs."""
    worst = 0.0
    leaves = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    others = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    for g, w in zip(leaves, others, strict=True):
        diff = (g.detach().double() - w.detach().double()).abs_()
        diff = diff[torch.isfinite(diff)]
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return worst


def floating_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every floating buffer of ``module`` by name (BatchNorm running statistics): what a
    training step mutates and gradient parity must compare too."""
    return {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}


def exact_step(
    module: torch.nn.Module, args: Sequence[torch.Tensor], *, seed: int = 0
) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`exact_gradients` plus the float64 copy's floating buffers after the step: the float64
    reference for output, gradients and mutated buffers of one training step (``module`` is not touched)."""
    double = float64_copy(module)
    out, grads = gradients(double, to_float64(args), seed=seed)
    return out, grads, floating_buffers(double)
