"""The contract's checks (esper.certification.contract) on plain callables: each catches a seeded breach of
its clause and passes the clean twin. Eager is the module itself; the "compiled" side is a Python function
that differs from it in exactly one way."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from esper.certification.contract import (
    Call,
    Clause,
    NonFiniteRegime,
    WeightChange,
    alternate,
    check_aliasing,
    check_metadata,
    check_mutation,
    check_nonfinite,
    close_to_eager,
    named_state,
    place_nonfinite,
    repeated_calls,
    snapshot,
    weight_sets,
)
from esper.numerics.parity import float64_reference


def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


# -- metadata ---------------------------------------------------------------------------------------------


def test_metadata_passes_eager_twin_and_another_stride_of_a_non_dense_output() -> None:
    y = X @ X.T
    assert check_metadata(y.clone(), y).passed
    # eager's output is a strided view (dense in no format): its strides promise nothing
    assert check_metadata(y[:, ::2].contiguous(), y[:, ::2]).passed


@pytest.mark.parametrize(
    ("compiled", "want"),
    [
        (lambda y: y.double(), "dtype torch.float64"),
        (lambda y: y[:3], "shape"),
        (lambda y: y.t().contiguous().t(), "not contiguous in torch.contiguous_format"),
        (lambda y: y.to_sparse(), "layout torch.sparse_coo"),
        (lambda y: (y, y), "outputs"),
    ],
)
def test_metadata_catches_each_difference(compiled, want: str) -> None:  # type: ignore[no-untyped-def]
    y = X @ X.T
    result = check_metadata(compiled(y), y)
    assert result.clause is Clause.METADATA and not result.passed and want in result.reason, result.reason


def test_metadata_requires_channels_last_where_eager_has_it() -> None:
    y = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    assert check_metadata(y.clone(), y).passed
    assert "channels_last" in check_metadata(y.contiguous(), y).reason


# -- aliasing ---------------------------------------------------------------------------------------------


def test_aliasing_catches_an_output_that_is_the_input_where_eager_copies() -> None:
    x_c, x_e = X.clone(), X.clone()
    result = check_aliasing((x_c, x_c + 1), (x_e.clone(), x_e + 1), [x_c], [x_e])
    assert not result.passed and "output[0]" in result.reason and "input 0" in result.reason
    assert check_aliasing((x_c.clone(), x_c + 1), (x_e.clone(), x_e + 1), [x_c], [x_e]).passed


def test_aliasing_sees_views_and_another_outputs_memory() -> None:
    x_c, x_e = X.clone(), X.clone()
    assert not check_aliasing(x_c[1:, 2:], x_e[1:, 2:].clone(), [x_c], [x_e]).passed  # a view with an offset
    assert check_aliasing(x_c[1:, 2:], x_e[1:, 2:], [x_c], [x_e]).passed  # eager returns the same view
    y = torch.randn(4, 8)
    shared = check_aliasing((y, y[0]), (y.clone(), y[0].clone()), [x_c], [x_e])
    assert not shared.passed and "output[1]" in shared.reason
    # disjoint halves of one storage do not overlap; empty tensors alias nothing
    assert check_aliasing((y[:2], y[2:], y[:0]), (y[:2].clone(), y[2:].clone(), y[:0]), [], []).passed


# -- mutation ---------------------------------------------------------------------------------------------


def run_both(compiled, eager):  # type: ignore[no-untyped-def]
    """Each side on its own copy of one module and input; the snapshot before, each side's state after."""
    m_c, m_e = module(), module()
    x_c, x_e = X.clone(), X.clone()
    before = snapshot(named_state([x_c], m_c))
    with torch.no_grad():
        compiled(m_c, x_c)
        eager(m_e, x_e)
    return before, named_state([x_c], m_c), named_state([x_e], m_e)


def test_mutation_catches_a_write_into_the_input_and_passes_its_twin() -> None:
    def eager(m, x):  # type: ignore[no-untyped-def]
        return m(x)

    def writes(m, x):  # type: ignore[no-untyped-def]
        y = m(x)
        x.mul_(0.5)
        return y

    result = check_mutation(*run_both(writes, eager))
    assert not result.passed and result.reason.startswith("mutation: input 0: written by the call (32 of 32")
    assert check_mutation(*run_both(eager, eager)).passed


def test_mutation_catches_a_weight_written_where_eager_writes_none() -> None:
    def eager(m, x):  # type: ignore[no-untyped-def]
        return m(x)

    def writes(m, x):  # type: ignore[no-untyped-def]
        m[0].bias[0] += 1e-7
        return m(x)

    result = check_mutation(*run_both(writes, eager))
    assert not result.passed and "parameter['0.bias']: written by the call (1 of 8" in result.reason


def test_mutation_judges_an_update_eager_makes_by_its_value() -> None:
    def eager(m, x):  # type: ignore[no-untyped-def]
        x[0].add_(1.0)  # updates one row, as a cache write does

    def reordered(m, x):  # type: ignore[no-untyped-def]
        x[0].add_(0.5).add_(0.5)  # the same update, another rounding order

    def spills(m, x):  # type: ignore[no-untyped-def]
        x[:2].add_(1.0)

    def wrong(m, x):  # type: ignore[no-untyped-def]
        x[0].add_(1.5)

    assert check_mutation(*run_both(reordered, eager), atol=1e-6, rtol=1e-6).passed
    assert "elements eager's update leaves unchanged" in check_mutation(*run_both(spills, eager), atol=1).reason
    assert "updated otherwise than eager (differs by 0.5)" in check_mutation(*run_both(wrong, eager)).reason


def test_mutation_of_a_running_statistic_is_judged_against_float64() -> None:
    bn = torch.nn.BatchNorm1d(8).train()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * 100
    m_e, m_c = bn, torch.nn.BatchNorm1d(8).train()
    before = snapshot(named_state([], m_e))
    copy64 = torch.nn.BatchNorm1d(8).double().train()  # the float64 step's buffers
    with torch.no_grad():
        m_e(x)
        copy64(x.double())
        m_c.momentum = 0.15  # a compiled update with the wrong momentum
        m_c(x)
    exact = named_state([], copy64)
    result = check_mutation(before, named_state([], m_c), named_state([], m_e), exact, atol=1e-5, rtol=1e-5)
    assert not result.passed and "buffer['running_mean']" in result.reason
    twin = torch.nn.BatchNorm1d(8).train()
    with torch.no_grad():
        twin(x)
    assert check_mutation(before, named_state([], twin), named_state([], m_e), exact, atol=1e-5, rtol=1e-5).passed


# -- non-finite values ------------------------------------------------------------------------------------


def test_place_nonfinite_is_seeded_and_places_each_kind() -> None:
    a, n = place_nonfinite([X, torch.arange(3)], NonFiniteRegime(seed=5, per_value=2))
    (b,) = place_nonfinite([X], NonFiniteRegime(seed=5, per_value=2))
    assert torch.equal(a.isnan(), b.isnan()) and int(a.isnan().sum()) == 2
    assert int((a == math.inf).sum()) == 2 and int((a == -math.inf).sum()) == 2
    assert torch.equal(n, torch.arange(3)) and torch.isfinite(X).all()  # the input itself untouched
    c, *_ = place_nonfinite([X], NonFiniteRegime(seed=6, per_value=2))
    assert not torch.equal(a.isnan(), c.isnan())


def nonfinite_case(compiled):  # type: ignore[no-untyped-def]
    m = module()
    (x,) = place_nonfinite([X], NonFiniteRegime(seed=0, per_value=2))
    with torch.no_grad():
        eager = m(x)
        got = compiled(m, x)
    return check_nonfinite(got, eager, float64_reference(m, [x]), atol=1e-5, rtol=1e-5)


def test_nonfinite_catches_a_kernel_that_hides_nan_and_passes_its_twin() -> None:
    hides = nonfinite_case(lambda m, x: m(torch.nan_to_num(x, 0.0, 0.0, 0.0)))
    assert not hides.passed and "compiled finite where eager is NaN and float64 NaN" in hides.reason
    assert nonfinite_case(lambda m, x: m(x)).passed


def test_nonfinite_catches_a_nan_made_from_an_inf_eager_keeps() -> None:
    # relu written as x * (x > 0): -inf * 0 is NaN where relu gives 0
    def relu_by_mask(m, x):  # type: ignore[no-untyped-def]
        return x * (x > 0)

    m = module()
    (x,) = place_nonfinite([X], NonFiniteRegime(seed=0, per_value=2))
    result = check_nonfinite(relu_by_mask(m, x), torch.relu(x), torch.relu(x.double()), atol=0, rtol=0)
    assert not result.passed and "compiled NaN where eager is finite and float64 finite" in result.reason


def test_nonfinite_admits_a_finite_value_where_only_eager_overflowed() -> None:
    x = torch.tensor([3e38, 3e38, -3e38])

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.sum(0, keepdim=True) / 3

    eager, exact = mean(x), mean(x.double())  # float32's partial sum overflows; float64's does not
    assert eager.isinf().all() and torch.isfinite(exact).all()
    scaled = mean(x / 4) * 4  # a kernel that rescales first: finite, float64's value
    assert check_nonfinite(scaled, eager, exact, atol=0, rtol=1e-6).passed
    wrong = torch.tensor([1.0])
    assert (
        "compiled finite where eager is +inf and float64 finite"
        in check_nonfinite(wrong, eager, exact, atol=0, rtol=1e-6).reason
    )


# -- weight sets ------------------------------------------------------------------------------------------


def test_weight_sets_are_named_deterministic_and_touch_only_floating_tensors() -> None:
    bn = torch.nn.BatchNorm1d(8)
    state = {**module().state_dict(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    sets = {s.change: s for s in weight_sets(state, seed=7)}
    assert set(sets) == set(WeightChange)
    w = state["0.weight"]
    assert torch.equal(sets[WeightChange.OWN].state["0.weight"], w)
    assert torch.allclose(sets[WeightChange.SCALED_UP].state["0.weight"], w * 10)
    assert torch.allclose(sets[WeightChange.SCALED_DOWN].state["0.weight"], w * 0.1)
    moved = sets[WeightChange.PERTURBED].state
    assert not torch.equal(moved["0.weight"], w) and not torch.equal(moved["bn.bias"], state["bn.bias"])
    assert (moved["bn.running_var"] >= 0).all()
    big = (sets[WeightChange.OUTLIERS].state["0.weight"] / w).isclose(torch.tensor(100.0))
    assert int(big.sum()) == 3
    for s in sets.values():
        assert torch.equal(s.state["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
        assert {k: (v.shape, v.dtype) for k, v in s.state.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}
    again = {s.change: s for s in weight_sets(state, seed=7)}
    other = {s.change: s for s in weight_sets(state, seed=8)}
    assert torch.equal(again[WeightChange.PERTURBED].state["0.weight"], moved["0.weight"])
    assert not torch.equal(other[WeightChange.PERTURBED].state["0.weight"], moved["0.weight"])
    assert torch.equal(state["0.weight"], w)  # the given state is left alone


def test_weight_sets_find_a_kernel_exact_only_at_its_own_weights() -> None:
    """A clamp the blueprint's weights never reach: parity at the own weights passes, grown weights fail."""

    def clamped(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m[0](x)
        bound = 3.0 * x.abs().amax() + 1.0
        return torch.relu(torch.minimum(torch.maximum(h, -bound), bound))

    def fails(state: dict[str, torch.Tensor]) -> bool:
        m = module()
        m.load_state_dict(state)
        with torch.no_grad():
            return not torch.allclose(clamped(m, X), m(X), atol=1e-5, rtol=1e-5)

    sets = {s.change: s.state for s in weight_sets(module().state_dict(), seed=0)}
    assert not fails(dict(sets[WeightChange.OWN])) and fails(dict(sets[WeightChange.SCALED_UP]))


# -- repeated calls ---------------------------------------------------------------------------------------


class Counting:
    """A kernel that keeps state across calls: right on its first call, off by ``step`` on each later one."""

    def __init__(self, step: float) -> None:
        self.calls, self.step = 0, step

    def __call__(self, weights: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.calls += 1
        return eager(weights, args) + self.step * (self.calls - 1)


STATES = {s.name: s.state for s in weight_sets(module().state_dict(), seed=0)}


def eager(weights: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    m = module()
    m.load_state_dict(dict(STATES[weights]))
    with torch.no_grad():
        return m(*args)


SCHEDULE = alternate(
    [Call(f"batch={b}", (torch.randn(b, 8),), w) for b in (1, 4) for w in ("own", "scaled-x10#0")], rounds=2
)


def test_alternate_changes_shape_and_weights_between_calls_and_keeps_every_call() -> None:
    assert len(SCHEDULE) == 8
    assert all(a.label != b.label or a.weights != b.weights for a, b in itertools.pairwise(SCHEDULE))
    first, second = SCHEDULE[:2]
    assert first.label != second.label and first.weights != second.weights
    for start in (0, 4):  # each round holds every (shape, weights) once
        assert len({(c.label, c.weights) for c in SCHEDULE[start : start + 4]}) == 4


def test_repeated_calls_find_the_first_call_that_drifts_and_pass_a_stateless_twin() -> None:
    agree = close_to_eager(atol=1e-5, rtol=1e-5)
    drifting = repeated_calls(Counting(0.5), eager, SCHEDULE, agree=agree)
    assert not drifting.passed and drifting.first is not None and drifting.first.index == 1
    assert drifting.clause().clause is Clause.REPEATED
    assert repeated_calls(eager, eager, SCHEDULE, agree=agree).passed


def test_repeated_calls_see_drift_inside_the_tolerance_as_lost_reproducibility() -> None:
    agree = close_to_eager(atol=1e-2, rtol=0)
    result = repeated_calls(Counting(1e-4), eager, SCHEDULE, agree=agree)
    assert result.first is not None and "its own answer to the same call earlier" in result.first.reason
    assert result.first.index == 4  # the first call that repeats an earlier (shape, weights)
    assert repeated_calls(Counting(1e-4), eager, SCHEDULE, agree=agree, reproducible=False).passed
