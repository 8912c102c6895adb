"""The training manifest's format: version 2 marks non-persistent buffers, version 1 still reads (every buffer
persistent), and the flag is validated as strictly as the rest of Urza's untrusted content. Nothing compiles:
a stand-in program runs a linear layer scaled by a non-persistent buffer through the real kernel and pre-warm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.tensors import TensorSpec, WeightSchemaError
from esper.artifacts.training_manifest import ArtifactFormatError, TrainingManifest
from esper.kasmina.kinds import TrainingLoader
from esper.kasmina.training_kernel import COMPILED, TrainingKernel, TrainingProgram
from esper.kasmina.unusable import Unusable
from esper.urza import Entry

GUARDS = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=16), DimGuard(size=4))),))


class Scaled(torch.nn.Module):
    """``linear(x) * scale``, ``scale`` a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return Scaled()


def manifest(**overrides: Any) -> TrainingManifest:
    fields: dict[str, Any] = {
        "blueprint": "scaled",
        "params": (TensorSpec("lin.weight", (3, 4), "float32"), TensorSpec("lin.bias", (3,), "float32")),
        "trainable": ("lin.weight", "lin.bias"),
        "buffers": (TensorSpec("scale", (3,), "float32"),),
        "nonpersistent": ("scale",),
        "forward_inputs": (("input", 0), ("param", "lin.weight"), ("param", "lin.bias"), ("buffer", "scale")),
        "forward_outputs": (("output", 0),),
        "backward_inputs": (("forward_input", 0), ("forward_input", 1), ("forward_input", 3), ("tangent", 0)),
        "backward_outputs": (("input", 0), ("param", "lin.weight"), ("param", "lin.bias")),
        "sizes": (),
        "n_inputs": 1,
        "n_outputs": 1,
        "differentiable": (0,),
        "out_spec": pytree.treespec_dumps(pytree.tree_flatten(torch.zeros(1))[1]),
    }
    return TrainingManifest(**{**fields, **overrides})


def program(seen: list[list[torch.Tensor]] | None = None) -> TrainingProgram:
    """The manifest wired to Python stand-ins for the two packages; ``seen`` collects each forward's inputs."""

    def forward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        if seen is not None:
            seen.append(list(args))
        x, w, b, s = args
        return [F.linear(x, w, b) * s]

    def backward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        x, w, s, g = args
        gs = g * s
        return [gs @ w, gs.t() @ x, gs.sum(0)]

    return TrainingProgram(manifest(), forward, backward)  # type: ignore[arg-type]


def entry() -> Entry:
    return Entry(
        blueprint="scaled",
        blueprint_version=1,
        content_hash="a" * 64,
        compat=current(),
        engine="aoti",
        status="certified",
        checksum="0" * 64,
        artifact_size=0,
        guards=GUARDS,
        artifact=ArtifactKind.TRAINING.value,
        variant="default",
        id=7,
    )


def test_the_schema_a_seed_matches_leaves_nonpersistent_buffers_out() -> None:
    m = manifest()
    assert set(m.weights()) == {"lin.weight", "lin.bias"} == set(build().state_dict())
    persistent = manifest(nonpersistent=())
    assert set(persistent.weights()) == {"lin.weight", "lin.bias", "scale"}


def test_version_2_round_trips_with_a_persistent_flag_per_buffer() -> None:
    m = manifest()
    data = json.loads(m.to_json())
    assert (data["format"], data["version"]) == ("esper-training/2", 2)
    assert data["buffers"] == [{"name": "scale", "shape": [3], "dtype": "float32", "persistent": False}]
    assert TrainingManifest.from_json(m.to_json()) == m


def test_a_version_1_manifest_reads_with_every_buffer_persistent() -> None:
    data = json.loads(manifest(nonpersistent=()).to_json())
    data["format"], data["version"] = "esper-training/1", 1
    for row in data["buffers"]:
        del row["persistent"]
    old = TrainingManifest.from_json(json.dumps(data))
    assert old.version == 1 and old.nonpersistent == ()
    assert set(old.weights()) == {"lin.weight", "lin.bias", "scale"}
    again = json.loads(old.to_json())
    assert (again["format"], again["version"]) == ("esper-training/1", 1) and "persistent" not in again["buffers"][0]
    assert TrainingManifest.from_json(old.to_json()) == old


@pytest.mark.parametrize(
    ("version", "flag", "message"),
    [
        (2, "missing", r"buffer 'scale': 'persistent' must be true or false, not None"),
        (2, "false", r"buffer 'scale': 'persistent' must be true or false, not 'false'"),
        (2, 0, r"buffer 'scale': 'persistent' must be true or false, not 0"),
        (2, None, r"buffer 'scale': 'persistent' must be true or false, not None"),
        (1, False, r"buffer 'scale': a version 1 manifest has no 'persistent' flag"),
        (0, "missing", r"training manifest version 0 does not exist"),
    ],
)
def test_the_persistent_flag_is_validated_strictly(version: int, flag: Any, message: str) -> None:
    data = json.loads(manifest().to_json())
    data["version"] = version
    if flag == "missing":
        del data["buffers"][0]["persistent"]
    else:
        data["buffers"][0]["persistent"] = flag
    with pytest.raises(ArtifactFormatError, match=message):
        TrainingManifest.from_json(json.dumps(data))


def test_nonpersistent_names_must_be_buffers_of_a_version_that_has_them() -> None:
    with pytest.raises(ArtifactFormatError, match=r"non-persistent buffers \['mask'\] are not buffers"):
        manifest(nonpersistent=("mask",))
    with pytest.raises(ArtifactFormatError, match="a version 1 manifest cannot hold non-persistent buffers"):
        manifest(version=1)


def test_a_state_dict_without_the_buffer_binds_and_trains_through_the_program() -> None:
    prog = program()
    kernel = TrainingKernel.create("scaled", program=prog, entry=entry(), reason="test", build=build)
    state = {k: v + 0.5 for k, v in build().state_dict().items()}
    assert "scale" not in state
    seed = kernel.bind(state)
    eager = build().train()
    eager.load_state_dict(state)
    x = torch.randn(5, 4)
    out = seed(x.clone().requires_grad_())
    out.sum().backward()
    assert seed.last_path == COMPILED
    eager(x).sum().backward()
    torch.testing.assert_close(out, eager(x))
    torch.testing.assert_close(seed.seed.lin.weight.grad, eager.lin.weight.grad)
    with pytest.raises(WeightSchemaError, match="'scale' is not a weight of"):
        kernel.bind({**state, "scale": torch.ones(3)})


def loader(build: Callable[[], torch.nn.Module]) -> TrainingLoader:
    return TrainingLoader(lambda e, k: list(e), torch.device("cpu"), build=build, inference=lambda: None, weights=None)


def test_prewarm_finds_nonpersistent_buffers_in_the_built_module() -> None:
    calls: list[list[torch.Tensor]] = []
    prog = program(calls)
    loader(build).prewarm(prog, entry())
    ((x, _, _, scale),) = calls
    assert x.shape == (1, 4)  # the smallest accepted shape
    assert torch.equal(scale, build().scale)

    def lacking() -> torch.nn.Module:
        module = build()
        del module.scale
        return module

    with pytest.raises(Unusable, match=r"reads \['scale'\], which the blueprint's module lacks"):
        loader(lacking).prewarm(prog, entry())
