"""What a PyTorch user does by habit with a kernel Kasmina hands out: every call agrees with the eager module
built independently from the blueprint, or runs eager with one WARNING saying why; nothing raises.

One tiny blueprint (tests/fixtures/habits: Linear, BatchNorm, ReLU, a ``scaling`` attribute) is compiled once
for this module. Its package keeps ``fc.weight`` as a constant and folds the rest, so seeds differ there.
"""

from __future__ import annotations

import copy
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune

from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from tests.support import FIXTURES, TRAINING, CountingOps, blueprint_module

pytestmark = pytest.mark.compiles

HABITS = FIXTURES / "habits"
NAME = "tiny_habits"


@pytest.fixture(scope="module")
def habits_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    from esper.catalog import load_catalog
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    path = tmp_path_factory.mktemp("habits-urza") / "urza.db"
    with Urza(path) as urza:
        entry = Tezzeret(urza).compile(load_catalog([HABITS]).get(NAME)).entry
        assert entry.engine == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


def oracle(state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The blueprint's module built independently of Kasmina, with ``state`` loaded."""
    module = blueprint_module(NAME, HABITS)
    if state is not None:
        module.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return module


def seed(k: int = 1) -> torch.nn.Module:
    """A seed of the blueprint: its own ``fc.weight`` (the constant), the blueprint's folded weights."""
    module = oracle()
    with torch.no_grad():
        module.fc.weight.copy_(torch.randn(8, 8, generator=torch.Generator().manual_seed(k)))
    return module


def load(urza: Path) -> Kernel:
    return Kasmina(urza, blueprint_paths=[HABITS]).load_seeds(NAME)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def agrees(kernel: torch.nn.Module, module: torch.nn.Module, path: str, x: torch.Tensor | None = None) -> None:
    """``kernel(x)`` equals an independent eager copy of ``module`` (in its mode) and took ``path``."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) if x is None else x
    want = copy.deepcopy(module) if module.training else module  # train mode moves its statistics
    with torch.no_grad():
        got = kernel(x)
        torch.testing.assert_close(got, want(x), atol=1e-5, rtol=1e-5)
    last = getattr(kernel, "last_path", None) or next(m.last_path for m in kernel.modules() if hasattr(m, "last_path"))
    assert last == path


# -- weights in another layout --------------------------------------------------------------------


def test_column_major_weights_are_read_as_they_are(habits_urza: Path) -> None:
    module = seed(1)
    module.fc.weight = torch.nn.Parameter(module.fc.weight.detach().t().contiguous().t())
    assert not module.fc.weight.is_contiguous()
    bound = load(habits_urza).bind(module)
    agrees(bound, module, COMPILED)
    # The layout may change after bind, and the values with it: every call reads the live tensor.
    with torch.no_grad():
        module.fc.weight.data = module.fc.weight.detach().contiguous()
        agrees(bound, module, COMPILED)
        module.fc.weight.data = torch.randn(8, 8).t()
        agrees(bound, module, COMPILED)
        module.fc.weight.mul_(0.5)
        agrees(bound, module, COMPILED)


# -- the seed as it is at each call -------------------------------------------------------------


def test_a_bound_seed_follows_its_module_through_assign_prune_and_replaced_parameters(habits_urza: Path) -> None:
    module = seed(2)
    bound = load(habits_urza).bind(module)
    agrees(bound, module, COMPILED)
    module.load_state_dict({**module.state_dict(), "fc.weight": torch.randn(8, 8) * 100}, assign=True)
    agrees(bound, module, COMPILED)
    module.fc.weight = torch.nn.Parameter(torch.randn(8, 8))
    agrees(bound, module, COMPILED)
    module.fc.weight.data = torch.randn(8, 8)
    agrees(bound, module, COMPILED)
    torch.nn.utils.prune.l1_unstructured(module.fc, "weight", 0.3)
    agrees(bound, module, EAGER)  # a pruned module recomputes its weight in a hook: its own forward runs
    torch.nn.utils.prune.remove(module.fc, "weight")
    agrees(bound, module, COMPILED)


def test_a_weight_of_another_shape_never_reaches_the_compiled_code(
    habits_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = seed(3)
    bound = load(habits_urza).bind(module)
    module.fc.weight.data = torch.randn(8, 4)
    x = torch.randn(5, 8)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"), torch.no_grad():
        with pytest.raises(RuntimeError) as eager:
            module(x)
        with pytest.raises(RuntimeError) as served:  # as eager does; compiled code would read out of bounds
            bound(x)
    assert str(served.value) == str(eager.value) and bound.last_path == EAGER
    assert [r.esper["reason"] for r in warnings_of(caplog)] == ["weights-changed"]  # type: ignore[attr-defined]
    module.fc.weight.data = torch.randn(8, 8)
    agrees(bound, module, COMPILED)


# -- a seed whose forward is not the blueprint's -------------------------------------------------


class Subclassed(type(oracle())):  # type: ignore[misc]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.scaling * torch.relu(self.norm(self.fc(x)))


def scaled(m: torch.nn.Module) -> None:
    m.scaling = 3.0


def hooked(m: torch.nn.Module) -> None:
    m.fc.register_forward_hook(lambda mod, args, out: out * 2)


def trained(m: torch.nn.Module) -> None:
    m.train()


@pytest.mark.parametrize("change", [scaled, hooked, trained], ids=["attribute", "hook", "train-mode"])
def test_a_seed_that_changes_form_after_bind_runs_its_own_forward_with_one_warning(
    habits_urza: Path, change: Callable[[torch.nn.Module], None], caplog: pytest.LogCaptureFixture
) -> None:
    module = seed(4)
    bound = load(habits_urza).bind(module)
    agrees(bound, module, COMPILED)
    change(module)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        for _ in range(2):
            agrees(bound, module, EAGER)
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "seed-form"  # type: ignore[attr-defined]


def test_a_subclass_with_the_same_weights_is_refused_with_one_warning(
    habits_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = Subclassed()
    module.load_state_dict(seed(5).state_dict())
    module.eval()
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        bound = load(habits_urza).bind(module)
        agrees(bound, module, EAGER)
        agrees(bound, module, EAGER)
        agrees(bound, module, EAGER, torch.randn(40, 8))  # outside the guards: the same forward
    assert [r.esper["reason"] for r in warnings_of(caplog)][:1] == ["seed-form"]  # type: ignore[attr-defined]
    assert [r.esper["reason"] for r in warnings_of(caplog)].count("seed-form") == 1  # type: ignore[attr-defined]


def test_a_seed_bound_in_train_mode_and_served_in_eval_mode_says_nothing(
    habits_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A trained seed is bound while still in train mode, then its host is put in eval mode before serving.
    module = seed(5).train()
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        host = torch.nn.Sequential(load(habits_urza).bind(module)).eval()
        agrees(host[0], module, COMPILED)
    assert warnings_of(caplog) == []


# -- modes --------------------------------------------------------------------------------------


def test_autocast_and_dispatch_modes_run_eager_for_bound_and_unbound_kernels(
    habits_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = seed(6)
    kernel = load(habits_urza)
    for k, reference in ((kernel, oracle()), (kernel.bind(module), module)):
        x = torch.randn(4, 8)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = k(x), copy.deepcopy(reference)(x)
        assert got.dtype == want.dtype and k.last_path == EAGER
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # eager's bfloat16 arithmetic, exactly
        with torch.no_grad(), CountingOps() as mode:
            k(x)
        assert mode.ops > 0 and k.last_path == EAGER
        with torch.no_grad():
            k(x)
        assert k.last_path == COMPILED
    assert {r.esper["reason"] for r in warnings_of(caplog)} == {"mode"}  # type: ignore[attr-defined]


# -- a good citizen of nn.Module ----------------------------------------------------------------


def test_kasminas_eager_module_is_in_neither_the_state_dict_nor_the_mode(tmp_path: Path) -> None:
    from esper.catalog import load_catalog

    # No inference entry for tiny_bn in an empty Urza: its kernel runs the eager module.
    kasmina = Kasmina(tmp_path / "urza.db", blueprint_paths=[TRAINING])
    host = torch.nn.Sequential(kasmina.load("tiny_bn"))
    reference = load_catalog([TRAINING]).get("tiny_bn").build().eval()
    with torch.no_grad():
        reference.bn.running_mean.uniform_(-1.0, 1.0)  # far from a batch's own statistics
    host[0].eager_module().load_state_dict(reference.state_dict())
    x = torch.randn(4, 8)
    with torch.no_grad():
        host(x)
        assert not host.state_dict()
        host.train()
        torch.testing.assert_close(host(x), reference(x))
    fresh = torch.nn.Sequential(kasmina.load("tiny_bn"))
    fresh.load_state_dict(host.state_dict(), strict=True)


def test_a_bound_seed_is_the_hosts_state_under_a_stable_name(habits_urza: Path) -> None:
    module = seed(7)
    host = torch.nn.Sequential(load(habits_urza).bind(module))
    agrees(host, module, COMPILED)
    assert set(host.state_dict()) == {f"0.seed.{k}" for k in module.state_dict()}
    other = torch.nn.Sequential(load(habits_urza).bind(seed(8)))
    other.load_state_dict(host.state_dict(), strict=True)
    agrees(other, module, COMPILED)
    host.train()  # the user's module follows the host's mode, and then runs its own train-mode forward
    agrees(host, module, EAGER)


# -- copies and pickles ---------------------------------------------------------------------------


def test_a_deep_copy_follows_its_own_weights(habits_urza: Path) -> None:
    module = seed(9)
    host = torch.nn.Sequential(load(habits_urza).bind(module))
    ema = copy.deepcopy(host)
    agrees(ema, module, COMPILED)
    with torch.no_grad():
        ema[0].seed.fc.weight.mul_(0.5)  # an EMA update of the copy (its other weights are folded)
    copied = ema[0].seed
    agrees(ema, copied, COMPILED)
    agrees(host, module, COMPILED)
    assert copied is not module
    unbound = copy.deepcopy(load(habits_urza))
    agrees(unbound, oracle(), COMPILED)


def test_a_pickled_kernel_loads_again_and_binds_its_seed(habits_urza: Path) -> None:
    module = seed(10)
    host = torch.nn.Sequential(load(habits_urza).bind(module))
    again = pickle.loads(pickle.dumps(host))
    agrees(again, module, COMPILED)
    built = Kernel(NAME, eager_factory=oracle, reason="built by hand")
    with pytest.raises(TypeError, match="did not load"):
        pickle.dumps(built)


# -- unsigned rows that disagree with their package -------------------------------------------------


def altered(urza: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    from esper.urza import Urza

    dest = tmp_path / "urza"
    shutil.copytree(urza.parent, dest)
    with Urza(dest / "urza.db") as u:
        (entry,) = u.entries(NAME)
        meta = copy.deepcopy(entry.meta)
        change(meta)
        u.update(entry.id, meta=meta)  # type: ignore[arg-type]
    return dest / "urza.db"


def other_shape(meta: dict[str, Any]) -> None:
    meta["constants"]["fc.weight"]["shape"] = [8, 9]


def other_name(meta: dict[str, Any]) -> None:
    meta["constants"]["fc.bias"] = {"shape": [8], "dtype": "float32"}  # a weight the package folded
    meta["folded_constants"] = [n for n in meta.get("folded_constants", []) if n != "fc.bias"]


@pytest.mark.parametrize("change", [other_shape, other_name], ids=["shape", "name"])
def test_recorded_constants_that_disagree_with_the_package_run_eager_naming_the_entry(
    habits_urza: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], caplog: pytest.LogCaptureFixture
) -> None:
    urza = altered(habits_urza, tmp_path, change)
    module = seed(11)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        bound = load(urza).bind(module)
        agrees(bound, module, EAGER)
    (record,) = warnings_of(caplog)
    assert "entry #" in record.esper["detail"] and "package" in record.esper["detail"]  # type: ignore[attr-defined]


# -- the watch: what it must still see, and what it may let through ---------------------------------------


class Doubled(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_submodule_whose_class_is_reassigned_runs_its_own_forward(
    habits_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = seed(12)
    bound = load(habits_urza).bind(module)
    agrees(bound, module, COMPILED)
    module.fc.__class__ = Doubled  # same __dict__, same tensors: only the class says the forward differs
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        agrees(bound, module, EAGER)
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "seed-form"  # type: ignore[attr-defined]


def test_a_replaced_parameter_that_requires_grad_gets_its_gradient(habits_urza: Path) -> None:
    module = seed(13).requires_grad_(False)  # a frozen seed: calls with grad on may run compiled
    bound = load(habits_urza).bind(module)
    x = torch.randn(4, 8)
    bound(x)
    assert bound.last_path == COMPILED
    module.fc.weight = torch.nn.Parameter(torch.randn(8, 8))  # requires grad, unlike the tensor it replaces
    bound(x).sum().backward()
    assert bound.last_path == EAGER
    want = copy.deepcopy(module)
    want(x).sum().backward()
    assert module.fc.weight.grad is not None and want.fc.weight.grad is not None
    torch.testing.assert_close(module.fc.weight.grad, want.fc.weight.grad)


def test_new_views_of_the_same_memory_are_seen_and_in_place_steps_are_served(habits_urza: Path) -> None:
    module = seed(14)
    bound = load(habits_urza).bind(module)
    agrees(bound, module, COMPILED)
    with torch.no_grad():
        for _ in range(3):  # an optimizer's in-place steps reach the compiled code through its alias
            module.fc.weight.add_(torch.randn(8, 8))
            agrees(bound, module, COMPILED)
        module.fc.weight.data = module.fc.weight.data.t()  # the same memory, now column-major
        agrees(bound, module, COMPILED)
        module.fc.weight.data = module.fc.weight.data.t()
        agrees(bound, module, COMPILED)
        module.norm.running_var.data = module.norm.running_var.data.flip(0).contiguous()  # a folded buffer
        agrees(bound, module, EAGER)
        module.fc.weight.data = module.fc.weight.data.view(4, 16)  # the same memory, another shape
        with pytest.raises(RuntimeError):
            bound(torch.randn(4, 8))
        assert bound.last_path == EAGER
