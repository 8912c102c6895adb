"""Legitimate float32 executions of an eager module and the calibrated yardstick (esper.numerics.executions).

The oracle is float64 arithmetic and torch's own eager kernels: a legitimate execution must agree with eager to
float32 rounding and be as close to float64 as eager is; the yardstick must still reject a lower-precision
accumulation and admit a clean float32 reordering."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.numerics.executions import (
    Conditioning,
    Reordered,
    Rounded,
    allowed_error,
    calibratable,
    calibrate,
    errors_of,
    spread,
)
from esper.numerics.gradients import exact_step, floating_buffers, gradients
from esper.numerics.gradients import upstream as gradient_upstream
from esper.numerics.parity import REDUCTION, float64_reference, judge, multiplier

aten = torch.ops.aten

EPS = torch.finfo(torch.float32).eps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 48), nn.Tanh(), nn.Linear(48, 16)).eval()


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x * 3.0, dim=-1) + torch.softmax(x, dim=1)


class Reductions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=-1, keepdim=True) + x.sum() / x.numel()
        return (x - m) * x.var(dim=(0, 2), keepdim=True).rsqrt() + x.norm(dim=1, keepdim=True)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(8, 12, 3, groups=2)
        self.up = nn.ConvTranspose2d(12, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.conv(x))


class Attention(nn.Module):
    """Scaled dot-product attention through torch's fused CPU kernel (4-d inputs), with an optional mask."""

    def __init__(self, causal: bool = False, masked: bool = False) -> None:
        super().__init__()
        self.causal, self.masked = causal, masked

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.masked:  # every query sees a fixed, irregular subset of the keys (always itself)
            keys = torch.arange(k.shape[-2])
            mask = ((keys[None, :] * 7 + keys[:, None] * 3) % 5 != 0) | torch.eye(k.shape[-2], dtype=torch.bool)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=1.0)


class Logits(nn.Module):
    """Attention written out: softmax of q k^T, times v."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def _qkv(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(shape, generator=g) / shape[-1] ** 0.25 for _ in range(3)]


# Small modules, each with its inputs: every contraction and reduction Reordered handles.
LEGITIMATE = {
    "linear": (lambda: nn.Linear(64, 40).eval(), lambda: [torch.randn(6, 5, 64, generator=_gen())]),
    "mlp": (_mlp, lambda: [torch.randn(8, 32, generator=_gen())]),
    "layer_norm": (lambda: nn.LayerNorm(48).eval(), lambda: [torch.randn(4, 7, 48, generator=_gen()) * 3 + 1]),
    "softmax": (Softmax, lambda: [torch.randn(4, 9, 33, generator=_gen())]),
    "reductions": (Reductions, lambda: [torch.randn(4, 9, 33, generator=_gen())]),
    "conv": (Conv, lambda: [torch.randn(2, 8, 10, 10, generator=_gen())]),
    "batch_norm_train": (
        lambda: nn.Sequential(nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6)).train(),
        lambda: [torch.randn(24, 6, 5, generator=_gen()) * 2 + 3],
    ),
    "sdpa": (Attention, lambda: _qkv((2, 3, 17, 16))),
    "sdpa_causal": (lambda: Attention(causal=True), lambda: _qkv((2, 3, 17, 16))),
    "sdpa_masked": (lambda: Attention(masked=True), lambda: _qkv((2, 3, 17, 16))),
    "logits": (Logits, lambda: _qkv((2, 17, 16))),
}


def _ulps(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS of a - b in ulps of the float64 reference's RMS."""
    return float((a.double() - b.double()).pow(2).mean().sqrt() / (EPS * exact.pow(2).mean().sqrt()))


def _rmse(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact).pow(2).mean().sqrt())


@pytest.mark.parametrize("name", LEGITIMATE)
def test_a_reordered_execution_is_the_same_function_rounded_otherwise(name: str) -> None:
    make, inputs = LEGITIMATE[name]
    module, args = make(), inputs()
    exact = float64_reference(module, args)
    with torch.no_grad():
        eager = module(*args)
        runs = []
        for seed in range(3):
            with Reordered(seed):
                runs.append(module(*args))
    rmse_eager = _rmse(eager, exact)
    for out in runs:
        # Within float32 rounding of eager (a mask or a permutation applied wrongly is off by the values' size) ...
        assert _ulps(out, eager, exact) < 16, name
        # ... and as close to float64 as eager is: the other order is no worse an approximation.
        assert _rmse(out, exact) <= 2 * rmse_eager + 4 * EPS * float(exact.pow(2).mean().sqrt()), name
    # It is another execution, not eager again: some seed rounds differently.
    assert any(not torch.equal(out, eager) for out in runs), name


def test_reordered_with_one_seed_repeats_itself() -> None:
    module, args = _mlp(), [torch.randn(8, 32, generator=_gen())]
    with torch.no_grad():
        with Reordered(5):
            a = module(*args)
        with Reordered(5):
            b = module(*args)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", LEGITIMATE)
def test_every_execution_spread_runs_is_legitimate(name: str) -> None:
    make, inputs = LEGITIMATE[name]
    s = spread(make(), inputs(), n=3)
    assert s.canonical.name == "eager"
    names = [e.name for e in s.executions]
    assert {"reorder-0", "reorder-1", "reorder-2"} <= set(names) and any(n.startswith("threads-") for n in names)
    assert ("sdpa-math" in names) == name.startswith("sdpa"), names  # only where the fused kernel ran
    for out in s.outputs:
        for execution, rmse in zip(s.executions, out.rmse, strict=True):
            assert rmse <= 2 * out.canonical_rmse + out.floor, (name, execution.name)
        assert out.disagreement_ulps < 16, name
        assert s.conditioning is Conditioning.WELL, name


def test_a_well_conditioned_mlp_spreads_within_a_small_factor_of_eager() -> None:
    s = spread(_mlp(), [torch.randn(64, 32, generator=_gen())], n=4)
    assert s.conditioning is Conditioning.WELL
    (out,) = s.outputs
    assert out.canonical_rmse > 0 and out.rmse_max <= 1.5 * out.canonical_rmse
    assert out.disagreement_ulps < 8
    # The yardstick is judge's rule, barely wider: eager's one sample was already a fair one.
    (allowed,) = allowed_error(s).outputs
    assert allowed.rmse <= 1.5 * (2 * out.canonical_rmse + out.floor)
    assert {"batch-reversed", "batch-halves"} <= {e.name for e in s.executions}


def _shared_direction(seed: int = 0) -> list[torch.Tensor]:
    """q and k sharing one large direction: logits ~1e6 whose differences are O(1), through a softmax."""
    g = _gen(seed)
    base = torch.randn(32, generator=g)
    q = base * 1e3 / 32**0.5 + torch.randn(2, 64, 32, generator=g)
    k = base * 1e3 / 32**0.5 + torch.randn(2, 64, 32, generator=g) * 0.1
    return [q, k, torch.randn(2, 64, 32, generator=g)]


def _mixed_tokens(seed: int = 0) -> list[torch.Tensor]:
    """Two tokens a thousand times larger in q and k, along one shared direction: their logits ~1e6 differ by
    O(1), so their softmax rows amplify rounding, and those few rows dominate the output's error."""
    g = _gen(seed)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=g) for _ in range(3))
    u = torch.randn(32, generator=g)
    u = u / u.norm()
    big = torch.tensor([17, 40])
    for t in (q, k):
        t[..., big, :] -= (t[..., big, :] @ u)[..., None] * u
        t[..., big, :] += 1e3 * u
    return [q, k, v]


def test_softmax_of_logits_near_1e6_is_ill_conditioned() -> None:
    s = spread(Logits(), _shared_direction(), n=4)
    assert s.conditioning is Conditioning.ILL
    (out,) = s.outputs
    # Every element amplifies rounding alike: the executions lie thousands of ulps from eager.
    assert out.disagreement_ulps > 1000
    assert s.evidence()["conditioning"] == "ill-conditioned"


def test_ill_conditioned_attention_spreads_several_times_and_the_yardstick_admits_what_judge_rejects() -> None:
    module, args = Attention(), _mixed_tokens()
    s = spread(module, args, n=6)
    assert s.conditioning is Conditioning.ILL
    (out,) = s.outputs
    assert out.rmse_max > 2.5 * out.rmse_min  # several-fold apart: which draw eager got decides a ratio
    # The story: judged against the luckiest legitimate execution as "eager", the unluckiest is rejected
    # by the one-sample rule; the calibrated yardstick admits it.
    exact = float64_reference(module, args)
    with torch.no_grad():
        runs = [module(*args)]
        for i in range(6):
            with Reordered(i):
                runs.append(module(*args))
    by_error = sorted(runs, key=lambda r: _rmse(r, exact))
    luckiest, unluckiest = by_error[0], by_error[-1]
    assert not judge(unluckiest, luckiest, exact, atol=1e-2, rtol=1e-2).passed
    assert allowed_error(s).admits(errors_of(unluckiest, exact, runs[0]))


class LowPrecisionMLP(nn.Module):
    """The same MLP (shared weights) with every matmul computed in a lower precision: a seeded precision defect."""

    def __init__(self, mlp: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.mlp, self.dtype = mlp, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                x = F.linear(x.to(self.dtype), layer.weight.to(self.dtype), layer.bias.to(self.dtype)).float()
            else:
                x = layer(x)
        return x


class PermutedMLP(nn.Module):
    """The same MLP with its hidden units permuted and the weights permuted to match: the same function, other
    float32 summation orders (a clean reordering a compiler may legitimately choose)."""

    def __init__(self, mlp: nn.Module, seed: int):
        super().__init__()
        g = _gen(seed)
        self.layers = nn.ModuleList()
        prev = None
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        for k, lin in enumerate(linears):
            w, b = lin.weight.detach(), lin.bias.detach()
            if prev is not None:
                w = w[:, prev]
            p = torch.randperm(w.shape[0], generator=g) if k < len(linears) - 1 else torch.arange(w.shape[0])
            new = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                new.weight.copy_(w[p])
                new.bias.copy_(b[p])
            self.layers.append(new)
            prev = p
        self.acts = [m for m in mlp if not isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.acts):
                x = self.acts[k](x)
        return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_yardstick_still_rejects_a_lower_precision_accumulation(dtype: torch.dtype) -> None:
    mlp, args = _mlp(), [torch.randn(64, 32, generator=_gen())]
    s = spread(mlp, args, n=4)
    yardstick = allowed_error(s)
    exact = float64_reference(mlp, args)
    with torch.no_grad():
        eager, defect = mlp(*args), LowPrecisionMLP(mlp, dtype)(*args)
    # Inside a loose declared tolerance ...
    torch.testing.assert_close(defect, eager, atol=5e-2, rtol=5e-2)
    # ... but far beyond what any legitimate float32 execution rounds to: rejected.
    reason = yardstick.excess(errors_of(defect, exact, eager))
    assert reason.startswith("output: RMSE against float64")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_yardstick_admits_a_clean_float32_reordering(seed: int) -> None:
    mlp, args = _mlp(), [torch.randn(64, 32, generator=_gen())]
    yardstick = allowed_error(spread(mlp, args, n=4))
    exact = float64_reference(mlp, args)
    with torch.no_grad():
        eager, twin = mlp(*args), PermutedMLP(mlp, seed)(*args)
    assert not torch.equal(twin, eager)  # it does round otherwise
    assert yardstick.admits(errors_of(twin, exact, eager))


def test_allowed_error_takes_a_multiplier_number_or_rule() -> None:
    s = spread(_mlp(), [torch.randn(64, 32, generator=_gen())], n=2)
    (out,) = s.outputs
    assert allowed_error(s, 3.0).outputs[0].rmse == pytest.approx(3.0 * out.rmse_max + out.floor)
    assert allowed_error(s, lambda numel, dtype: 1.0).outputs[0].rmse == pytest.approx(out.rmse_max + out.floor)
    assert allowed_error(s).outputs[0].rmse >= 2 * out.canonical_rmse  # never below judge's own rule


class Raises(nn.Module):
    """Fails only on one thread: spread must restore the thread count on the way out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() == 1:
            raise RuntimeError("one thread")
        return self.fc(x)


def test_spread_leaves_no_state_behind() -> None:
    bn = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)).train()
    args = [torch.randn(12, 16, generator=_gen())]
    probe = _mlp(3)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    stats = [b.clone() for b in bn.buffers()]
    x = torch.randn(5, 32, generator=_gen(1))
    with torch.no_grad():
        before = probe(x)
    s = spread(bn, args, n=2)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(stats, bn.buffers(), strict=True))  # running stats put back
    assert torch.is_grad_enabled()
    with torch.no_grad():
        assert torch.equal(probe(x), before)  # no reordering mode left active
    # Train-mode BatchNorm couples the batch: its halves see other statistics, so that execution is skipped.
    skipped = dict(s.skipped)
    assert "coupled" in skipped["batch-halves"] and "batch-reversed" in {e.name for e in s.executions}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs on one thread here: threads-2 is the other count")
def test_the_thread_count_is_restored_when_the_module_raises() -> None:
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="one thread"):
        spread(Raises(), [torch.randn(4, 8, generator=_gen())], n=1)
    assert torch.get_num_threads() == threads


class Embedded(nn.Module):
    """Integer inputs and an integer buffer beside the floating arithmetic, and an integer output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(50, 24)
        self.register_buffer("positions", torch.arange(10))
        self.pos = nn.Embedding(10, 24)
        self.fc = nn.Linear(24, 12)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.embed(tokens) + self.pos(self.positions[: tokens.shape[1]]))
        return h.softmax(-1), (tokens * 3).sum(-1)


def test_spread_handles_integer_inputs_buffers_and_outputs() -> None:
    module = Embedded().eval()
    tokens = torch.randint(0, 50, (6, 10), generator=_gen())
    s = spread(module, [tokens], n=2)
    assert [o.name for o in s.outputs] == ["output[0]"]  # the integer output is exact: no error to measure
    assert s.conditioning is Conditioning.WELL
    assert {"batch-reversed", "batch-halves"} <= {e.name for e in s.executions}
    assert torch.equal(module.positions, torch.arange(10))
    with torch.no_grad(), Reordered(0):
        _, total = module(tokens)
    assert torch.equal(total, (tokens * 3).sum(-1))


def test_a_reference_may_be_given_as_outputs_or_a_function() -> None:
    mlp, args = _mlp(), [torch.randn(16, 32, generator=_gen())]
    exact = float64_reference(mlp, args)
    by_default = spread(mlp, args, n=1)
    given = spread(mlp, args, exact, n=1)
    computed = spread(mlp, args, lambda a: float64_reference(mlp, a), n=1)
    assert by_default.outputs == given.outputs == computed.outputs
    # Another reference is measured against: eager's own output as "reference" leaves eager no error at all.
    with torch.no_grad():
        (out,) = spread(mlp, args, mlp(*args), n=1).outputs
    assert out.canonical_rmse == 0 < by_default.outputs[0].canonical_rmse


# -- a whole training step: forward, backward, buffer updates -------------------------------------------------


def _step(module: nn.Module, seed: int = 0) -> Callable[[Sequence[torch.Tensor]], dict[str, Any]]:
    """One training step of a fresh copy of ``module``, its parts named as certification judges them."""

    def run(args: Sequence[torch.Tensor]) -> dict[str, Any]:
        fresh = copy.deepcopy(module)
        out, grads = gradients(fresh, args, seed=seed)
        return {"output": out.detach(), "gradient": grads, "buffer": floating_buffers(fresh)}

    return run


def _exact_step(module: nn.Module, args: Sequence[torch.Tensor], seed: int = 0) -> dict[str, Any]:
    out, grads, buffers = exact_step(module, args, seed=seed)
    return {"output": out.detach(), "gradient": grads, "buffer": buffers}


def _judged(got: dict[str, Any], eager: dict[str, Any], exact: dict[str, Any], tol: float) -> dict[str, Any]:
    return {
        part: judge(got[part], eager[part], exact[part], atol=tol, rtol=tol, label=part, reduction=factor)
        for part, factor in (("output", 1.0), ("gradient", REDUCTION), ("buffer", REDUCTION))
    }


def _train_mlp() -> nn.Module:
    return _mlp().train()


def _shifted_bn() -> tuple[nn.Module, list[torch.Tensor]]:
    """A Linear before a train-mode BatchNorm fed inputs of ~1e3 that differ by ~1: the weight gradient sums
    terms of ~1e3 that cancel (the BatchNorm's backward has zero batch mean) to ~1, so the batch order of its
    sum decides thousands of ulps."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8)).train()
    return module, [1e3 + torch.randn(16, 16, generator=_gen())]


def test_a_step_spread_reorders_the_backward_and_names_parts_as_judge_does() -> None:
    module, args = _train_mlp(), [torch.randn(64, 32, generator=_gen())]
    exact = _exact_step(module, args)
    s = spread(_step(module), args, exact, n=3, parts=True)
    names = [o.name for o in s.outputs]
    assert names[0] == "output" and "gradient['0.weight']" in names and "gradient['input 0']" in names
    verdict = judge(
        _step(module)(args)["gradient"], exact["gradient"], exact["gradient"], atol=0, rtol=0, label="gradient"
    )
    assert {o.name for o in verdict.outputs} == {n for n in names if n.startswith("gradient")}
    # The backward is reordered too: a gradient of a reordered execution is not eager's bit for bit.
    eager, seen = _step(module)(args), Reordered(0)
    with seen:
        reordered = _step(module)(args)
    assert aten.mm.default in seen.seen and not torch.equal(
        reordered["gradient"]["0.weight"], eager["gradient"]["0.weight"]
    )
    # A step's parameter gradients sum over the batch: no batch execution is one of its legitimate executions.
    assert {"batch-reversed", "batch-halves"} <= dict(s.skipped).keys()
    assert s.conditioning is Conditioning.WELL and s.part("gradient").conditioning is Conditioning.WELL
    for out in s.part("gradient").outputs:
        assert out.disagreement_ulps < 16, out.name


class LowPrecisionGrad(torch.autograd.Function):
    """``x @ w.T`` whose weight gradient is accumulated in a lower precision (a seeded precision defect): the
    forward and the input gradient stay float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.dtype = dtype
        return x @ w.T

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w = ctx.saved_tensors
        return g @ w, (g.to(ctx.dtype).T @ x.to(ctx.dtype)).float(), None


def _swap_linears(module: nn.Module, dtype: torch.dtype) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.forward = (  # type: ignore[method-assign]
                lambda x, lin=layer: LowPrecisionGrad.apply(x, lin.weight, dtype) + lin.bias
            )


def _defective_step(module: nn.Module, args: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    defect = copy.deepcopy(module)
    _swap_linears(defect, dtype)  # on this copy: a further deep copy would keep the lambdas' original layers
    out, grads = gradients(defect, args, seed=0)
    return {"output": out.detach(), "gradient": grads, "buffer": floating_buffers(defect)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_step_yardstick_still_rejects_a_weight_gradient_accumulated_in_lower_precision(dtype: torch.dtype) -> None:
    module, args = _train_mlp(), [torch.randn(64, 32, generator=_gen())]
    exact, eager = _exact_step(module, args), _step(module)(args)
    defect = _defective_step(module, args, dtype)
    assert torch.equal(defect["output"], eager["output"])  # the forward is eager's: only the gradient is wrong
    s = spread(_step(module), args, exact, n=4, parts=True)
    # Inside a loose declared tolerance (the pointwise rule holds) ...
    verdicts = _judged(defect, eager, exact, tol=0.5)
    assert not verdicts["gradient"].passed and calibratable(verdicts), verdicts["gradient"].reason
    # ... but beyond what any legitimate float32 execution of the step rounds to: still rejected.
    calibrated = calibrate(verdicts, s)
    assert not calibrated.admitted and calibrated.verdicts == verdicts
    (part,) = calibrated.parts
    assert part.part == "gradient" and "weight']: RMSE against float64" in part.reason


def test_the_step_yardstick_still_rejects_a_bfloat16_weight_gradient_where_the_step_is_ill_conditioned() -> None:
    module, args = _shifted_bn()
    exact, eager = _exact_step(module, args), _step(module)(args)
    s = spread(_step(module), args, exact, n=4, parts=True)
    assert s.part("gradient").conditioning is Conditioning.ILL
    verdicts = _judged(_defective_step(module, args, torch.bfloat16), eager, exact, tol=0.5)
    assert not verdicts["gradient"].passed
    calibrated = calibrate(verdicts, s)
    assert not calibrated.verdicts["gradient"].passed and not calibrated.admitted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_step_yardstick_admits_gradients_summed_over_the_batch_in_another_order(seed: int) -> None:
    module, args = _train_mlp(), [torch.randn(64, 32, generator=_gen())]
    exact, eager = _exact_step(module, args), _step(module)(args)
    s = spread(_step(module), args, exact, n=4, parts=True)
    # The clean twin: the same step on the batch in a seeded other order (the upstream gradient permuted with
    # it), the input gradient put back: every parameter gradient is its batch sum in another float32 order.
    p = torch.randperm(64, generator=_gen(seed))
    fresh = copy.deepcopy(module)
    x = args[0][p].clone().requires_grad_(True)
    out = fresh(x)
    (upstream,) = gradient_upstream([eager["output"]], 0)
    params = list(fresh.named_parameters())
    grads = torch.autograd.grad(out, [x, *(w for _, w in params)], upstream[p])
    twin = {
        "output": out.detach()[torch.argsort(p)],
        "gradient": {
            "input 0": grads[0][torch.argsort(p)],
            **{n: g for (n, _), g in zip(params, grads[1:], strict=True)},
        },
        "buffer": {},
    }
    assert not torch.equal(twin["gradient"]["0.weight"], eager["gradient"]["0.weight"])  # it rounds otherwise
    for part, factor in (("output", 1.0), ("gradient", REDUCTION)):
        rule = allowed_error(s.part(part), lambda numel, dtype, f=factor: multiplier(numel, dtype) * f)
        got = errors_of({part: twin[part]}, {part: exact[part]}, {part: eager[part]}, parts=True)
        assert rule.admits(got), rule.excess(got)


def test_an_ill_conditioned_gradient_is_judged_against_the_spread_and_recorded_as_such() -> None:
    module, args = _shifted_bn()
    exact, eager = _exact_step(module, args), _step(module)(args)
    s = spread(_step(module), args, exact, n=4, parts=True)
    weight = s.part("gradient['0.weight']")
    (out,) = weight.outputs
    assert weight.conditioning is Conditioning.ILL and out.disagreement_ulps > 1000
    # A weight gradient off float64 by a little more than judge's gradient rule grants eager's own error, and
    # less than it grants the executions' largest: rejected by the one-sample rule, within the rule applied to
    # the spread.
    e = eager["gradient"]["0.weight"]
    f = exact["gradient"]["0.weight"]
    noise = torch.randn(e.shape, generator=_gen(3), dtype=torch.float64)
    m = multiplier(out.numel, out.dtype) * REDUCTION
    assert out.rmse_max > 1.25 * out.canonical_rmse  # the executions reach well past eager's one sample
    target = min(1.1 * m * out.canonical_rmse, 0.9 * m * out.rmse_max)
    got = {
        **eager,
        "gradient": {**eager["gradient"], "0.weight": (f + noise * target / noise.pow(2).mean().sqrt()).float()},
    }
    verdicts = _judged(got, eager, exact, tol=1e-3)
    assert not verdicts["gradient"].passed and calibratable(verdicts), verdicts["gradient"].reason
    calibrated = calibrate(verdicts, s)
    assert calibrated.admitted and all(v.passed for v in calibrated.verdicts.values())
    (part,) = calibrated.parts
    assert (part.part, part.conditioning) == ("gradient", Conditioning.ILL)
    assert part.disagreement_ulps > 1000 and part.spread_ratio >= 1.0


def test_rounded_moves_each_computed_value_by_at_most_one_ulp_and_leaves_memory_and_copies_alone() -> None:
    x = torch.randn(512, generator=_gen())
    with Rounded(0):
        y = x * 3.0
        copied = x.clone()
        view = x.view(16, 32)
        counter = torch.ones(4).add_(1.0)
    exact = x.double() * 3.0
    # Eager's rounding (half an ulp), or the float32 neighbour on the other side: within 1.5 ulps.
    assert bool(((y.double() - exact).abs() <= 1.5 * EPS * exact.abs()).all())
    assert 100 < int((y != x * 3.0).sum()) < 412  # about half the elements moved
    assert torch.equal(copied, x) and view.data_ptr() == x.data_ptr() and torch.equal(counter, torch.full((4,), 2.0))


def _kinked() -> tuple[nn.Module, list[torch.Tensor]]:
    """A convolution's output, large bias plus a small signal, through a train-mode BatchNorm whose batch variance
    is below its eps: the normalisation multiplies the convolution's last bit by hundreds, so a ReLU's input near
    zero falls on either side in honest float32 executions, and the input gradient behind it takes either value."""
    torch.manual_seed(4)
    module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).train()
    with torch.no_grad():
        module[0].bias.uniform_(1.0, 2.0)
    return module, [1e-3 * torch.randn(4, 4, 16, 16, generator=_gen(4))]


def _rounded_step(module: nn.Module, args: Sequence[torch.Tensor], seed: int) -> dict[str, Any]:
    """The clean twin: the step with every intermediate rounded to one of its two float32 neighbours (a seed no
    spread uses), as a kernel that fuses or folds differently rounds."""
    with Rounded(seed):
        return _step(module)(args)


def test_a_gradient_behind_a_kink_within_rounding_is_admitted_and_recorded_ill_conditioned() -> None:
    module, args = _kinked()
    exact, eager = _exact_step(module, args), _step(module)(args)
    twin = _rounded_step(module, args, 101)
    verdicts = _judged(twin, eager, exact, tol=1e-4)
    # One ReLU decided the other way: the input gradient is far beyond the one-sample rule ...
    assert not verdicts["gradient"].passed and "gradient['input 0']" in verdicts["gradient"].reason
    assert calibratable(verdicts)
    s = spread(_step(module), args, exact, n=4, parts=True)
    assert any(e.name.startswith("rounded-") for e in s.executions)
    # ... and within what the legitimate executions of the step do.
    calibrated = calibrate(verdicts, s)
    assert calibrated.admitted, [p.reason for p in calibrated.parts]
    (part,) = calibrated.parts
    assert (part.part, part.conditioning) == ("gradient", Conditioning.ILL)


def test_a_wrong_gradient_beside_a_kink_is_still_rejected() -> None:
    module, args = _kinked()
    exact, eager = _exact_step(module, args), _step(module)(args)
    twin = _rounded_step(module, args, 101)
    # The seeded defect: the same honest rounding, and the last layer's weight gradient (no kink behind it) off
    # by a tenth of itself.
    defect = {**twin, "gradient": {**twin["gradient"], "3.weight": twin["gradient"]["3.weight"] * 1.1}}
    verdicts = _judged(defect, eager, exact, tol=1e-4)
    calibrated = calibrate(verdicts, spread(_step(module), args, exact, n=4, parts=True))
    assert not calibrated.admitted and not calibrated.verdicts["gradient"].passed
    assert any("3.weight']" in p.reason for p in calibrated.parts)


def test_a_spread_stops_at_the_first_execution_that_is_enough_and_admits_what_the_whole_spread_admits() -> None:
    module, args = _kinked()
    exact, eager = _exact_step(module, args), _step(module)(args)
    verdicts = _judged(_rounded_step(module, args, 101), eager, exact, tol=1e-4)
    asked: list[int] = []

    def admits(s: Any) -> bool:
        asked.append(len(s.executions))
        return calibrate(verdicts, s).admitted

    short = spread(_step(module), args, exact, n=4, parts=True, enough=admits)
    whole = spread(_step(module), args, exact, n=4, parts=True)
    # Asked after every execution but eager, and stopped at the first answer yes: fewer executions than all.
    assert asked == list(range(2, len(short.executions) + 1)) and len(short.executions) < len(whole.executions)
    assert calibrate(verdicts, short).admitted and calibrate(verdicts, whole).admitted
    # Never asked: every execution runs.
    assert [e.name for e in whole.executions][:2] == ["eager", "rounded-0"]
