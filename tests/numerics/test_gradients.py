"""esper.numerics.gradients: one training step's gradients, its float64 reference, and the mutated buffers."""

from __future__ import annotations

import pytest
import torch

from esper.numerics.gradients import SLACK, exact_gradients, exact_step, floating_buffers, gradients, tolerance
from esper.numerics.parity import judge


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh()).train()


def test_gradients_names_inputs_and_parameters() -> None:
    m = net()
    x = torch.randn(8, 6)
    out, grads = gradients(m, [x], seed=1)
    assert out.shape == (8, 5)
    assert set(grads) == {"input 0", "0.weight", "0.bias", "1.weight", "1.bias"}
    assert x.grad is None and all(p.grad is None for p in m.parameters())  # nothing accumulates
    _, again = gradients(net(), [x], seed=1)
    assert all(torch.equal(grads[n], again[n]) for n in grads)  # same seed, same upstream gradient


def test_exact_gradients_are_float64_and_leave_the_module_alone() -> None:
    m = net()
    before = floating_buffers(m)
    x = torch.randn(8, 6)
    out, grads = exact_gradients(m, [x], seed=1)
    assert out.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads.values())
    assert all(torch.equal(before[n], b) for n, b in floating_buffers(m).items())
    assert next(m.parameters()).dtype == torch.float32
    _, fp32 = gradients(m, [x], seed=1)
    worst = max(float((fp32[n].double() - g).abs().max()) for n, g in grads.items())
    assert worst < 1e-5  # the same step, rounded differently


def test_exact_step_returns_the_float64_buffers_after_the_step() -> None:
    m = net()
    x = torch.randn(8, 6) * 3
    out, grads, bufs = exact_step(m, [x], seed=2)
    ref_out, ref_grads = exact_gradients(m, [x], seed=2)
    assert torch.equal(out, ref_out) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    assert set(bufs) == {"1.running_mean", "1.running_var"}  # num_batches_tracked is not floating
    assert all(b.dtype == torch.float64 for b in bufs.values())
    gradients(m, [x], seed=2)  # the float32 step updates m's own running statistics the same way
    fp32 = floating_buffers(m)
    assert judge(fp32, fp32, bufs, atol=1e-6, rtol=1e-6, label="buffer").passed
    assert not torch.equal(fp32["1.running_mean"], torch.zeros(5))


def test_tolerance_unchanged() -> None:
    eager = torch.tensor([1.0, 2.0])
    exact = torch.tensor([1.0, 2.0 + 1e-6], dtype=torch.float64)
    atol, rtol = tolerance(1e-5, 1e-4, eager, exact)
    assert atol == pytest.approx(1e-5 + SLACK * 1e-6, rel=1e-3) and rtol == 1e-4
