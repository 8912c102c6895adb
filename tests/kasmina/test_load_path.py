"""Kasmina's one load path and the kernel bookkeeping both kinds share, without compiling anything.

A training "program" here is two Python functions in place of the two AOTInductor packages (a linear layer's
forward and its backward), and Urza holds hand-written entries: cheap enough for every test run, and it
reaches every branch that does not depend on the native loader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.tensors import TensorSpec
from esper.artifacts.training_manifest import TrainingManifest
from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel, Route, Unusable, WeightSchemaError
from esper.kasmina.base import refusal_pattern
from esper.kasmina.choose import choose_entry_id, choose_training_entry
from esper.kasmina.training_kernel import TrainingKernel, TrainingProgram
from esper.urza import Entry, Urza
from tests.support import TINY

GUARDS = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=64), DimGuard(size=8))),))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def entry(id_: int, *, artifact: ArtifactKind, engine: str = "aoti", status: str = "certified", **kw: object) -> Entry:
    fields: dict = {
        "blueprint": "tiny_mlp",
        "blueprint_version": 1,
        "content_hash": "a" * 64,
        "compat": current(),
        "engine": engine,
        "status": status,
        "checksum": "0" * 64,
        "artifact_size": 0,
        "guards": GUARDS,
        "artifact": artifact.value,
        "variant": "default",
        "id": id_,
        **kw,
    }
    return Entry(**fields)


# -- a linear layer's training program, in Python -----------------------------------------------------------


def linear_program() -> TrainingProgram:
    manifest = TrainingManifest(
        blueprint="linear",
        params=(TensorSpec("weight", (4, 8), "float32"), TensorSpec("bias", (4,), "float32")),
        trainable=("weight", "bias"),
        buffers=(),
        forward_inputs=(("input", 0), ("param", "weight"), ("param", "bias")),
        forward_outputs=(("output", 0),),
        backward_inputs=(("forward_input", 0), ("forward_input", 1), ("tangent", 0)),
        backward_outputs=(("input", 0), ("param", "weight"), ("param", "bias")),
        sizes=(),
        n_inputs=1,
        n_outputs=1,
        differentiable=(0,),
        out_spec=pytree.treespec_dumps(pytree.tree_flatten(torch.zeros(1))[1]),
    )

    def forward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.linear(*args)]

    def backward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        x, w, g = args
        return [g @ w, g.t() @ x, g.sum(0)]

    return TrainingProgram(manifest, forward, backward)  # type: ignore[arg-type]


def linear() -> torch.nn.Module:
    return torch.nn.Linear(8, 4).train()


def linear_kernel(seed: torch.nn.Module) -> TrainingKernel:
    return TrainingKernel.for_program(
        "linear", program=linear_program(), entry=entry(7, artifact=ArtifactKind.TRAINING), build=linear, seed=seed
    )


def test_for_program_trains_through_the_program_like_eager() -> None:
    seed, eager = linear(), linear()
    eager.load_state_dict(seed.state_dict())
    kernel = linear_kernel(seed)
    assert kernel.route == COMPILED and kernel.entry is not None and kernel.entry.id == 7
    assert kernel.program is not None and kernel.seed is seed
    x = torch.randn(5, 8)
    kernel(x).square().sum().backward()
    eager(x).square().sum().backward()
    assert kernel.last_path == COMPILED and kernel.calls == {COMPILED: 1}
    for (name, p), q in zip(seed.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_training_kernel_warns_once_per_refusal_pattern_not_per_size(caplog: pytest.LogCaptureFixture) -> None:
    """The drift bug: the training kernel warned once per refused size, the inference kernel once per pattern."""
    kernel = linear_kernel(linear())
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        for batch in (65, 70, 65, 100):
            kernel(torch.randn(batch, 8))
        with pytest.raises(RuntimeError):  # another refusal pattern (a fixed dim), which eager rejects too
            kernel(torch.randn(3, 9))
    assert kernel.calls == {EAGER: 5}
    details = [r.esper["detail"] for r in warnings_of(caplog)]  # type: ignore[attr-defined]
    assert len(details) == 2, details
    assert "65" in details[0] and "outside guard range [1, 64]" in details[0]
    assert "dim 1 is 9" in details[1]
    assert {r.esper["reason"] for r in warnings_of(caplog)} == {"outside-guards"}  # type: ignore[attr-defined]


def test_refusal_pattern_ignores_numbers_only() -> None:
    assert refusal_pattern("input 'x' dim 0 is 65, outside [1, 64]") == refusal_pattern(
        "input 'x' dim 0 is 70, outside [1, 64]"
    )
    assert refusal_pattern("input 'x' dim 0 is 65") != refusal_pattern("input 'y' dim 0 is 65")


def test_bound_training_kernels_share_the_program_and_check_the_schema() -> None:
    kernel = linear_kernel(linear())
    other = kernel.bind(linear().state_dict())
    assert other.program is kernel.program and other.seed is not kernel.seed
    with pytest.raises(WeightSchemaError, match=r"'weight' is float32\[4, 9\]"):
        kernel.bind({"weight": torch.zeros(4, 9), "bias": torch.zeros(4)})


def test_an_eager_training_kernel_runs_the_seed() -> None:
    seed = linear()
    kernel = TrainingKernel.create("linear", program=None, entry=None, reason="why", build=linear, weights=seed)
    assert kernel.route == EAGER and kernel.reason == "why" and kernel.program is None
    x = torch.randn(2, 8)
    torch.testing.assert_close(kernel(x), seed(x))
    kernel.eval()
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), seed(x))
    assert kernel.calls == {EAGER: 2}


# -- inference kernels derived by binding ------------------------------------------------------------------


def tiny() -> torch.nn.Module:
    from esper.catalog import load_catalog

    return load_catalog([TINY]).get("tiny_mlp").build()


def test_binding_derives_from_the_loaded_kernel_and_warns_once_per_origin(caplog: pytest.LogCaptureFixture) -> None:
    folded = entry(3, artifact=ArtifactKind.INFERENCE, meta={"swappable": False, "constants": {}}, profile="default")

    def not_called(args: list[torch.Tensor]) -> torch.Tensor:
        raise AssertionError("a folded route must not run a seed's call")

    loaded = Kernel("tiny_mlp", eager_factory=tiny, routes=[Route.of(folded, not_called)], reason="loaded")
    state = {k: v + 1 for k, v in tiny().state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        a = loaded.bind(state)
        b = a.bind(tiny())  # binding a bound kernel binds the loaded one
    assert a.origin is loaded and b.origin is loaded and loaded.origin is loaded
    assert a.route == EAGER and b.route == EAGER
    assert [r.esper["reason"] for r in warnings_of(caplog)] == ["unbindable"]  # type: ignore[attr-defined]
    # The origin is no submodule: a seed's kernel holds its own weights only.
    x = torch.randn(2, 8)
    with torch.no_grad():
        a(x)
    assert set(a.state_dict()) == {f"seed.{k}" for k in state}
    with torch.no_grad():
        torch.testing.assert_close(a.state_dict()["seed.fc.bias"], state["fc.bias"])


def test_binding_refuses_a_route_that_holds_no_loaded_package() -> None:
    constants = {n: TensorSpec.of(n, t).to_dict() for n, t in tiny().state_dict().items()}
    swappable = entry(3, artifact=ArtifactKind.INFERENCE, meta={"constants": constants, "folded_constants": []})
    loaded = Kernel("tiny_mlp", eager_factory=tiny, routes=[Route.of(swappable, lambda a: a[0])], reason="loaded")
    with pytest.raises(TypeError, match="only a kernel Kasmina loaded can be bound"):
        loaded.bind(tiny())


# -- choosing, per kind ---------------------------------------------------------------------------------------


def test_choosing_by_id_keeps_to_the_kind() -> None:
    inference, training = entry(1, artifact=ArtifactKind.INFERENCE), entry(2, artifact=ArtifactKind.TRAINING)
    key = current()
    assert choose_entry_id([training, inference], key, 1, kind=ArtifactKind.INFERENCE) == [inference]
    assert choose_entry_id([training, inference], key, 2, kind=ArtifactKind.TRAINING) == [training]
    with pytest.raises(Unusable) as info:
        choose_entry_id([training, inference], key, 2, kind=ArtifactKind.INFERENCE)
    assert info.value.code == "no-certified-entry" and info.value.detail == (
        "entry #2 is not a compiled inference artifact"
    )
    with pytest.raises(Unusable) as info:
        choose_entry_id([training, inference], key, 1, kind=ArtifactKind.TRAINING)
    assert info.value.code == "no-training-artifact"


def test_the_training_choice_reads_the_artifact_column_not_the_variant() -> None:
    key = current()
    # An inference entry whose variant happens to be "train" is no training artifact, and vice versa.
    misleading = entry(1, artifact=ArtifactKind.INFERENCE, variant="train")
    with pytest.raises(Unusable, match="Urza has no training artifact for it"):
        choose_training_entry([misleading], key)
    training = entry(2, artifact=ArtifactKind.TRAINING, variant="default")
    assert choose_training_entry([training, misleading], key) == [training]


# -- the load path, end to end, on hand-written Urza rows ------------------------------------------------------


@pytest.fixture
def garbage_urza(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """An Urza whose compiled entries (one of each kind) hold an artifact that verifies but is no package."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"PK\x03\x04 not a package" * 10)
    ids = {}
    with Urza(tmp_path / "urza.db") as urza:
        checksum, size = urza.store.add(garbage)
        for kind in ArtifactKind:
            row = entry(0, artifact=kind, checksum=checksum, artifact_size=size).with_(id=None)
            ids[kind.value] = urza.publish(row).id
    return tmp_path / "urza.db", ids  # type: ignore[return-value]


def test_both_kinds_report_an_unloadable_artifact_as_load_failed(
    garbage_urza: tuple[Path, dict[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    path, ids = garbage_urza
    kasmina = Kasmina(path, blueprint_paths=[TINY])
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        inference = kasmina.load("tiny_mlp")
        training = kasmina.load_training("tiny_mlp")
    assert inference.route == EAGER and training.route == EAGER
    assert [r.esper["reason"] for r in warnings_of(caplog)] == ["load-failed", "load-failed"]  # type: ignore[attr-defined]
    assert training.entry is not None and training.entry.id == ids["training"]
    assert training.reason.startswith(f"training entry #{ids['training']}: ")
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), tiny()(x))


def test_loading_an_entry_by_id_refuses_the_other_kind(
    garbage_urza: tuple[Path, dict[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    path, ids = garbage_urza
    kasmina = Kasmina(path, blueprint_paths=[TINY])
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        inference = kasmina.load_entry("tiny_mlp", ids["training"])
        training = kasmina.load_training("tiny_mlp", entry_id=ids["inference"])
    assert inference.reason == f"entry #{ids['training']} is not a compiled inference artifact"
    assert training.reason == f"entry #{ids['inference']} is not a compiled training artifact"
    reasons = [r.esper["reason"] for r in warnings_of(caplog)]  # type: ignore[attr-defined]
    assert reasons == ["no-certified-entry", "no-training-artifact"]


def test_an_entry_without_guards_is_an_integrity_problem_for_both_kinds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Urza(tmp_path / "urza.db") as urza:
        for kind in ArtifactKind:
            urza.publish(entry(0, artifact=kind, guards=None).with_(id=None))
    kasmina = Kasmina(tmp_path / "urza.db", blueprint_paths=[TINY])
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kasmina.load("tiny_mlp")
        kasmina.load_training("tiny_mlp")
    details = [r.esper["detail"] for r in warnings_of(caplog)]  # type: ignore[attr-defined]
    assert [r.esper["reason"] for r in warnings_of(caplog)] == ["integrity", "integrity"]  # type: ignore[attr-defined]
    assert details[0].startswith("entry #") and details[1].startswith("training entry #")
    assert all(d.endswith("has no guard schema") for d in details)


# -- stored dtype names are data ----------------------------------------------------------------------------


def test_a_stored_dtype_name_must_name_a_dtype() -> None:
    assert TensorSpec.from_dict("w", {"shape": [2], "dtype": "bfloat16"}).torch_dtype == torch.bfloat16
    for bad in ("Tensor", "__class__", "nn"):  # attributes of torch that are no dtype
        with pytest.raises(WeightSchemaError, match=f"{bad!r} is not a torch dtype"):
            TensorSpec.from_dict("w", {"shape": [2], "dtype": bad})


def test_a_manifest_naming_no_dtype_is_a_format_error() -> None:
    from esper.artifacts.training_manifest import ArtifactFormatError

    text = linear_program().manifest.to_json().replace('"float32"', '"Tensor"', 1)
    with pytest.raises(ArtifactFormatError, match="'Tensor' is not a torch dtype"):
        TrainingManifest.from_json(text)
