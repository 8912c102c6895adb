"""A training kernel under what a PyTorch user does by habit: mixed precision and dispatch modes, seeds whose
module is not quite the blueprint's, weights replaced, pruned, resized or column-major, gradient penalties,
EMA copies, checkpoints, and a host's state dict.

Every call is compared with the eager module built independently from the catalog (the blueprint's builder,
the seed's weights, the same change applied), never with anything the kernel built.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune
from torch.overrides import TorchFunctionMode

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.tensors import WeightSchemaError
from esper.kasmina.training_kernel import COMPILED, EAGER, TrainingKernel
from esper.urza import Urza
from tests.support import CountingOps, build_training, perturbed
from tests.support import kasmina_warnings as warnings_of
from tests.support import load_training as load

pytestmark = pytest.mark.compiles

X_LORA = 256


def build(name: str, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The oracle: the blueprint's module from the catalog, with ``state`` loaded, in train mode."""
    return build_training(name, state).train()


def step(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of a loss: the output and every gradient (parameters by name, the input as
    ``"input"``), gradients cleared afterwards."""
    x = x.clone().requires_grad_()
    out = module(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert x.grad is not None
    grads["input"] = x.grad
    for p in module.parameters():
        p.grad = None
    return out.detach(), grads


def same_step(kernel: TrainingKernel, oracle: torch.nn.Module, x: torch.Tensor, path: str, tol: float = 1e-4) -> None:
    got_out, got = step(kernel, x)
    assert kernel.last_path == path, kernel.check(x)
    want_out, want = step(oracle, x)
    assert got_out.dtype == want_out.dtype
    torch.testing.assert_close(got_out, want_out, atol=tol, rtol=tol)
    got = {n.removeprefix("seed."): g for n, g in got.items()}
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=tol, rtol=tol, msg=n)


# -- modes ------------------------------------------------------------------------------------------------------


class DoubledLinear(TorchFunctionMode):
    """Changes what eager computes: every ``F.linear`` returns twice its value."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        return out * 2 if func is torch.nn.functional.linear else out


def test_autocast_and_dispatch_modes_train_eager_as_eager_does(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = perturbed("lora_adapter", 1)
    kernel, oracle = load(training_urza, "lora_adapter", state), build("lora_adapter", state)
    x = torch.randn(4, X_LORA)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                same_step(kernel, oracle, x, EAGER)
        assert kernel(x).dtype == torch.float32  # outside the block: compiled again
        assert kernel.last_path == COMPILED
        with DoubledLinear():
            same_step(kernel, oracle, x, EAGER)
        recording = CountingOps()
        with recording:
            kernel(x)
        assert kernel.last_path == EAGER and recording.ops > 0
        same_step(kernel, oracle, x, COMPILED)
    records = warnings_of(caplog)
    assert [r.esper["reason"] for r in records] == ["mode"] * 3  # one per kind: autocast, function, dispatch
    assert "autocast" in records[0].esper["detail"] and "TorchDispatchMode" in records[2].esper["detail"]


# -- the seed module's form ---------------------------------------------------------------------------------------


def lora_subclass(module: torch.nn.Module) -> torch.nn.Module:
    base = type(module)
    module.__class__ = type("ScaledLoRA", (base,), {"forward": lambda self, x: base.forward(self, x) * 1.5})
    return module


def lora_hooked(module: torch.nn.Module) -> torch.nn.Module:
    module.lora_b.register_forward_hook(lambda m, args, out: out * 3)
    return module


def lora_rescaled(module: torch.nn.Module) -> torch.nn.Module:
    module.scaling = 5.0
    return module


@pytest.mark.parametrize("change", [lora_subclass, lora_hooked, lora_rescaled], ids=lambda f: f.__name__)
def test_a_seed_whose_forward_is_not_the_blueprints_trains_eager(
    training_urza: Path, caplog: pytest.LogCaptureFixture, change: Callable[[torch.nn.Module], torch.nn.Module]
) -> None:
    state = perturbed("lora_adapter", 2)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = load(training_urza, "lora_adapter", change(build("lora_adapter", state)))
        oracle = change(build("lora_adapter", state))
        x = torch.randn(5, X_LORA)
        same_step(kernel, oracle, x, EAGER)
        same_step(kernel, oracle, torch.randn(3, X_LORA), EAGER)
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "seed-form"
    assert kernel.check(x) is not None and "form" in (kernel.check(x) or "")


def test_the_form_is_kept_true_at_every_call(training_urza: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = perturbed("lora_adapter", 3)
    kernel, oracle = load(training_urza, "lora_adapter", state), build("lora_adapter", state)
    x = torch.randn(4, X_LORA)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        same_step(kernel, oracle, x, COMPILED)
        hooks = [m.lora_b.register_forward_hook(lambda m, args, out: out * 3) for m in (kernel.seed, oracle)]
        same_step(kernel, oracle, x, EAGER)
        for h in hooks:
            h.remove()
        same_step(kernel, oracle, x, COMPILED)
        for m in (kernel.seed, oracle):
            m.scaling = 4.0
        same_step(kernel, oracle, x, EAGER)
        for m in (kernel.seed, oracle):
            m.scaling = 2.0  # the blueprint's value again (16 / 8)
        same_step(kernel, oracle, x, COMPILED)
        kernel.seed.lora_a.eval()  # a submodule in another mode than the compiled step was traced in
        same_step(kernel, oracle, x, EAGER)
        kernel.train()
        same_step(kernel, oracle, x, COMPILED)
    assert {r.esper["reason"] for r in warnings_of(caplog)} == {"seed-form"}
    assert len(warnings_of(caplog)) == 3


# -- the kernel follows the seed module ------------------------------------------------------------------------


def test_the_kernel_follows_the_seed_module_through_replacement_pruning_and_resizing(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = perturbed("lora_adapter", 4)
    kernel, oracle = load(training_urza, "lora_adapter", state), build("lora_adapter", state)
    x = torch.randn(6, X_LORA)
    g = torch.Generator().manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        same_step(kernel, oracle, x, COMPILED)
        other = perturbed("lora_adapter", 6)
        for m in (kernel.seed, oracle):
            m.load_state_dict({k: v.clone() for k, v in other.items()}, assign=True)
        same_step(kernel, oracle, x, COMPILED)
        w = torch.randn(8, X_LORA, generator=g) * 0.05
        for m in (kernel.seed, oracle):
            m.lora_a.weight = torch.nn.Parameter(w.clone())
        same_step(kernel, oracle, x, COMPILED)
        # A replaced submodule: the compiled step must read the new one's weights, not the old one's.
        w = torch.randn(X_LORA, 8, generator=g) * 0.1
        for m in (kernel.seed, oracle):
            m.lora_b = torch.nn.Linear(8, X_LORA, bias=False)
            with torch.no_grad():
                m.lora_b.weight.copy_(w)
        same_step(kernel, oracle, x, COMPILED)
        # Pruning moves the weight out of the parameters and adds a forward pre-hook: eager, never a KeyError.
        for m in (kernel.seed, oracle):
            prune.l1_unstructured(m.lora_a, "weight", amount=0.5)
        same_step(kernel, oracle, x, EAGER)
        for m in (kernel.seed, oracle):
            prune.remove(m.lora_a, "weight")
        same_step(kernel, oracle, x, COMPILED)
        # Another rank through .data: eager runs it; the compiled code must never see the other shape.
        a, b = torch.randn(4, X_LORA, generator=g) * 0.05, torch.randn(X_LORA, 4, generator=g) * 0.1
        for m in (kernel.seed, oracle):
            m.lora_a.weight.data = a.clone()
            m.lora_b.weight.data = b.clone()
        same_step(kernel, oracle, x, EAGER)
        for m in (kernel.seed, oracle):
            m.lora_a.weight.data = torch.zeros(8, X_LORA)
            m.lora_b.weight.data = torch.zeros(X_LORA, 8)
        same_step(kernel, oracle, x, COMPILED)
    reasons = [r.esper["reason"] for r in warnings_of(caplog)]
    assert reasons == ["seed-form", "weights-changed"], reasons


def test_functional_call_and_torch_func_grad_over_the_seeds_parameters_match_eager(training_urza: Path) -> None:
    from torch.func import functional_call, grad

    kernel, oracle = load(training_urza, "lora_adapter"), build("lora_adapter")
    x = torch.randn(4, X_LORA)
    new = {n: p.detach() + 0.01 for n, p in oracle.named_parameters()}
    got = functional_call(kernel, {f"seed.{n}": p for n, p in new.items()}, (x,))
    assert kernel.last_path == COMPILED  # plain tensors swapped in: the compiled step reads them
    torch.testing.assert_close(got, functional_call(oracle, new, (x,)), atol=1e-4, rtol=1e-4)
    trainable = {n: t for n, t in new.items() if n.startswith("lora")}

    def loss(module: torch.nn.Module, prefix: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return lambda p: functional_call(module, {prefix + n: t for n, t in p.items()}, (x,)).square().mean()

    got_grads = grad(loss(kernel, "seed."))(trainable)
    assert kernel.last_path == EAGER  # functorch-wrapped weights: compiled code cannot read them
    want = grad(loss(oracle, ""))(trainable)
    for n in want:
        torch.testing.assert_close(got_grads[n], want[n], atol=1e-4, rtol=1e-4, msg=n)
    kernel(x)
    assert kernel.last_path == COMPILED


def column_major(module: torch.nn.Module) -> torch.nn.Module:
    for name in ("base.weight", "lora_a.weight", "lora_b.weight"):
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        p = getattr(sub, attr)
        setattr(sub, attr, torch.nn.Parameter(p.detach().t().contiguous().t(), requires_grad=p.requires_grad))
        assert not getattr(sub, attr).is_contiguous()
    return module


def test_column_major_weights_train_compiled_with_gradients_on_the_users_parameters(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = perturbed("lora_adapter", 7)
    seed = column_major(build("lora_adapter", state))
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = load(training_urza, "lora_adapter", seed)
        oracle = build("lora_adapter", state)
        x = torch.randn(5, X_LORA)
        same_step(kernel, oracle, x, COMPILED)
        kernel(x).square().mean().backward()
    assert kernel.seed is seed and seed.lora_a.weight.grad is not None and seed.base.weight.grad is None
    assert warnings_of(caplog) == []


def test_a_strided_buffer_trains_eager_and_is_updated_as_eager_updates_it(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = perturbed("tiny_bn", 13)
    kernel, oracle = load(training_urza, "tiny_bn", state), build("tiny_bn", state)
    for m in (kernel.seed, oracle):
        strided = torch.zeros(16)[::2]
        strided.copy_(m.bn.running_mean)
        m.bn.running_mean = strided
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        same_step(kernel, oracle, torch.randn(6, 8), EAGER)
    torch.testing.assert_close(kernel.seed.bn.running_mean, oracle.bn.running_mean)
    (record,) = warnings_of(caplog)
    assert (
        record.esper["reason"] == "weights-changed" and "'bn.running_mean' is not contiguous" in record.esper["detail"]
    )


# -- double backward ---------------------------------------------------------------------------------------------


def penalty_step(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A gradient penalty: the norm of d(output)/d(input), differentiated again."""
    x = x.clone().requires_grad_()
    out = module(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (out.mean() + gx.square().sum()).backward()
    grads = {n.removeprefix("seed."): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()  # type: ignore[union-attr]
    for p in module.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("name", ["lora_adapter", "tiny_bn"])
def test_a_gradient_penalty_through_a_compiled_step_matches_eager(
    training_urza: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    state = perturbed(name, 8)
    kernel, oracle = load(training_urza, name, state), build(name, state)
    x = torch.randn(6, X_LORA if name == "lora_adapter" else 8, generator=torch.Generator().manual_seed(8))
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        same_step(kernel, oracle, x, COMPILED)  # first order: the compiled backward, no WARNING
        assert warnings_of(caplog) == []
        for _ in range(2):
            got, want = penalty_step(kernel, x), penalty_step(oracle, x)
            assert kernel.last_path == COMPILED
            assert set(got) == set(want)
            for n in want:
                # A penalty's gradients reach thousands (lora_adapter's input gradient): fp32 rounding of the
                # compiled forward is judged against each tensor's own scale, not a fixed absolute bound.
                scale = float(want[n].abs().max())
                torch.testing.assert_close(got[n], want[n], atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=n)
    # Buffers moved once per forward, as eager's did (the recomputation updates none).
    for n, b in oracle.named_buffers():
        torch.testing.assert_close(kernel.seed.get_buffer(n), b, msg=n)
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "double-backward"


# -- copies and checkpoints --------------------------------------------------------------------------------------


class Host(torch.nn.Module):
    """A host model with a seed slot, as a growing network holds one."""

    def __init__(self, seed: torch.nn.Module) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(8, 8)
        self.slot = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slot(torch.tanh(self.pre(x)))


def oracle_host(state: dict[str, torch.Tensor]) -> Host:
    """An independent eager host: the blueprint's module in the slot, loaded from a kernel host's state dict."""
    host = Host(build("tiny_bn"))
    host.load_state_dict({k.replace("slot.seed.", "slot."): v for k, v in state.items()}, strict=True)
    return host


def sgd(module: torch.nn.Module, x: torch.Tensor, lr: float = 0.1) -> None:
    module(x).square().mean().backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def test_deepcopy_and_an_ema_copy_follow_their_own_weights(training_urza: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    kernel = load(training_urza, "tiny_bn", perturbed("tiny_bn", 9))
    host = Host(kernel)
    copied = copy.deepcopy(kernel)
    assert copied.program is kernel.program and copied.seed is not kernel.seed
    shallow = copy.copy(kernel)  # nn.Module's shallow copy: the same seed module, nothing loaded again
    assert shallow.seed is kernel.seed and shallow.program is kernel.program
    ema = AveragedModel(host, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        sgd(host, torch.randn(8, 8, generator=gen))
        before = {k: v.clone() for k, v in host.state_dict().items()}
        ema.update_parameters(host)
        for k, v in host.state_dict().items():
            assert torch.equal(v, before[k]), k  # the EMA update moved only the copy
    ema_host: Host = ema.module  # type: ignore[assignment]
    assert ema_host.slot is not kernel and ema_host.slot.seed is not kernel.seed
    assert not torch.equal(ema_host.slot.seed.fc.weight, kernel.seed.fc.weight)
    oracle = oracle_host(ema_host.state_dict())
    x = torch.randn(6, 8, generator=gen)
    torch.testing.assert_close(ema_host(x), oracle(x), atol=1e-5, rtol=1e-5)
    assert ema_host.slot.last_path == COMPILED
    for n, b in oracle.named_buffers():  # the copy's own running statistics moved, as eager's
        torch.testing.assert_close(ema_host.get_buffer(n.replace("slot.", "slot.seed.")), b, msg=n)
    x = torch.randn(4, 8, generator=gen)
    torch.testing.assert_close(copied(x), build("tiny_bn", perturbed("tiny_bn", 9))(x), atol=1e-5, rtol=1e-5)
    assert copied.last_path == COMPILED


def test_a_pickled_host_loads_its_kernel_again_and_binds_the_seed(training_urza: Path) -> None:
    kernel = load(training_urza, "tiny_bn", perturbed("tiny_bn", 10))
    host = Host(kernel)
    sgd(host, torch.randn(8, 8))
    buffer = io.BytesIO()
    torch.save(host, buffer)
    buffer.seek(0)
    loaded: Host = torch.load(buffer, weights_only=False)
    assert isinstance(loaded.slot, TrainingKernel) and loaded.slot.route == COMPILED
    assert loaded.slot.seed is not kernel.seed and loaded.slot.program is kernel.program
    want = host.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    oracle = oracle_host(want)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), oracle(x), atol=1e-5, rtol=1e-5)
    assert loaded.slot.last_path == COMPILED
    kernel.source = None
    with pytest.raises(TypeError, match="no source to load it again"):
        pickle.dumps(host)


# -- a manifest that disagrees with the blueprint ---------------------------------------------------------------


def rewrite_manifest(urza_path: Path, name: str, change: Callable[[dict[str, Any]], None]) -> int:
    """Replace ``name``'s training artifact by one whose manifest ``change`` edited (an unsigned row)."""
    with Urza(urza_path) as urza:
        (entry,) = [e for e in urza.entries(name) if e.artifact == ArtifactKind.TRAINING]
        src = urza.store.verify(entry.checksum, entry.artifact_size)
        out = urza_path.parent / "edited.zip"
        with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as w:
            for member in z.namelist():
                data = z.read(member)
                if member == "manifest.json":
                    manifest = json.loads(data)
                    change(manifest)
                    data = json.dumps(manifest).encode()
                w.writestr(member, data)
        checksum, size = urza.store.add(out)
        urza.update(entry.id, checksum=checksum, artifact_size=size)  # type: ignore[arg-type]
        return int(entry.id)  # type: ignore[arg-type]


def _wrong_shape(manifest: dict[str, Any]) -> None:
    (row,) = [r for r in manifest["params"] if r["name"] == "fc.weight"]
    row["shape"] = [4, 8]


def _renamed_weight(manifest: dict[str, Any]) -> None:
    """Every slot of ``fc.bias`` renamed: the program wires up, but reads a tensor the blueprint lacks."""
    renamed = json.loads(json.dumps(manifest).replace('"fc.bias"', '"fc.offset"'))
    manifest.clear()
    manifest.update(renamed)


@pytest.mark.parametrize(("change", "tensor"), [(_wrong_shape, "fc.weight"), (_renamed_weight, "fc.offset")])
def test_a_manifest_that_disagrees_with_the_blueprint_trains_eager(
    training_copy: Path, caplog: pytest.LogCaptureFixture, change: Callable[[dict[str, Any]], None], tensor: str
) -> None:
    entry_id = rewrite_manifest(training_copy, "tiny_bn", change)
    state = perturbed("tiny_bn", 11)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = load(training_copy, "tiny_bn", state)
        same_step(kernel, build("tiny_bn", state), torch.randn(4, 8), EAGER)
    assert kernel.route == EAGER
    (record,) = warnings_of(caplog)
    assert f"#{entry_id}" in record.esper["detail"] and repr(tensor) in record.esper["detail"]
    # The caller's own weights not matching the blueprint stay the caller's error.
    with pytest.raises(WeightSchemaError, match=r"fc\.weight"):
        load(training_copy, "tiny_bn", {**state, "fc.weight": torch.zeros(4, 8)})


# -- a host's nn.Module operations -------------------------------------------------------------------------------


def test_a_hosts_state_dict_and_modes_are_the_seeds(training_urza: Path) -> None:
    host = Host(load(training_urza, "tiny_bn", perturbed("tiny_bn", 12)))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        sgd(host, torch.randn(8, 8, generator=gen) * 2 + 1)
    host.eval()
    with torch.no_grad():
        host(torch.randn(4, 8, generator=gen))
    names = set(host.state_dict())
    assert names == {"pre.weight", "pre.bias"} | {f"slot.seed.{k}" for k in build("tiny_bn").state_dict()}
    state = host.state_dict()
    fresh = Host(load(training_urza, "tiny_bn"))
    fresh.load_state_dict(state, strict=True)
    oracle = oracle_host(state)
    for module in (host, fresh, oracle):
        module.eval()
    x = torch.randn(5, 8, generator=gen)
    with torch.no_grad():  # eval: the running statistics, not the batch's
        torch.testing.assert_close(host(x), oracle(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(x), oracle(x), atol=1e-5, rtol=1e-5)
    for n, b in oracle.named_buffers():  # eval calls move nothing
        assert torch.equal(fresh.get_buffer(n.replace("slot.", "slot.seed.")), b), n
    for module in (fresh, oracle):
        module.train()
    x = torch.randn(7, 8, generator=gen)
    sgd(fresh, x)
    sgd(oracle, x)
    assert fresh.slot.last_path == COMPILED
    for n, b in oracle.named_buffers():  # train calls update the statistics exactly as eager's
        torch.testing.assert_close(fresh.get_buffer(n.replace("slot.", "slot.seed.")), b, msg=n)
    assert set(fresh.state_dict()) == names


# -- a training loop's operations in any order ---------------------------------------------------------------------

OPERATIONS = (
    "step",
    "no_grad",
    "load_state_dict",
    "assign",
    "replace_parameter",
    "prune",
    "unprune",
    "eval",
    "train",
    "deepcopy",
    "autocast",
    "thread",
)


def _collecting(call: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        call()
    except BaseException as e:  # re-raised in the test's thread
        errors.append(e)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=10), seed=st.integers(0, 2**16))
@example(ops=["prune", "eval", "no_grad", "deepcopy", "unprune", "deepcopy", "train", "autocast"], seed=0)
@example(ops=["assign", "replace_parameter", "thread", "eval", "load_state_dict", "train"], seed=1)
def test_any_sequence_of_training_loop_operations_matches_eager(training_urza: Path, ops: list[str], seed: int) -> None:
    """tiny_bn (weights and BatchNorm statistics) driven through a random sequence of what a training loop
    does, each operation applied to the kernel's seed and to the oracle alike; every call compared."""
    state = perturbed("tiny_bn", seed)
    kernel, oracle = load(training_urza, "tiny_bn", state), build("tiny_bn", state)
    gen = torch.Generator().manual_seed(seed)
    pruned = False

    def compare(grad: bool = True) -> None:
        x = torch.randn(int(torch.randint(2, 12, (1,), generator=gen)), 8, generator=gen)
        if grad:
            got_out, got = step(kernel, x)
            want_out, want = step(oracle, x)
            for n in want:
                torch.testing.assert_close(
                    got[n if n == "input" else f"seed.{n}"], want[n], atol=1e-4, rtol=1e-4, msg=n
                )
        else:
            with torch.no_grad():
                got_out, want_out = kernel(x), oracle(x)
        torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
        for n, b in oracle.named_buffers():
            torch.testing.assert_close(kernel.seed.get_buffer(n), b, atol=1e-5, rtol=1e-5, msg=n)

    for op in ops:
        if op == "load_state_dict" or op == "assign":
            new = perturbed("tiny_bn", int(torch.randint(0, 2**16, (1,), generator=gen)))
            if pruned:  # a pruned module's state dict holds weight_orig and weight_mask instead
                weight = new.pop("fc.weight")
                new = {**new, "fc.weight_orig": weight, "fc.weight_mask": oracle.fc.weight_mask.clone()}
            for m in (kernel.seed, oracle):
                m.load_state_dict({k: v.clone() for k, v in new.items()}, assign=op == "assign")
        elif op == "replace_parameter":
            bias = torch.randn(8, generator=gen)
            for m in (kernel.seed, oracle):
                m.fc.bias = torch.nn.Parameter(bias.clone())
        elif op == "prune" and not pruned:
            for m in (kernel.seed, oracle):
                prune.l1_unstructured(m.fc, "weight", amount=0.25)
            pruned = True
        elif op == "unprune" and pruned:
            for m in (kernel.seed, oracle):
                prune.remove(m.fc, "weight")
            pruned = False
        elif op == "eval":
            kernel.eval()
            oracle.eval()
        elif op == "train":
            kernel.train()
            oracle.train()
        elif op == "deepcopy":
            try:
                copied = copy.deepcopy(oracle)
            except RuntimeError:  # torch cannot deepcopy a pruned module whose weight is no graph leaf
                with pytest.raises(RuntimeError, match="graph leaves"):
                    copy.deepcopy(kernel)
            else:
                kernel, oracle = copy.deepcopy(kernel), copied
        elif op == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compare()
        elif op == "thread":
            errors: list[BaseException] = []
            worker = threading.Thread(target=_collecting, args=(compare, errors))
            worker.start()
            worker.join()
            if errors:
                raise errors[0]
        compare(grad=op != "no_grad")
