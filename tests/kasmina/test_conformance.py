"""esper.kasmina.conformance as plain calls: each thing that makes eager compute otherwise is named, and its
clean twin (the same module or thread state without it) is not."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from esper.kasmina.conformance import SeedForm, mode_problem


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scaling


class Subclass(Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Passing(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class PassingFunctions(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_a_clean_thread_state_has_no_mode_problem() -> None:
    assert mode_problem() is None
    with torch.no_grad(), torch.inference_mode():
        assert mode_problem() is None


@pytest.mark.parametrize(
    ("enter", "word"),
    [
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16), "autocast"),
        (lambda: torch.device("cpu"), "TorchFunctionMode"),
        (PassingFunctions, "TorchFunctionMode"),
        (Passing, "TorchDispatchMode"),
    ],
)
def test_each_mode_that_changes_eager_is_named(enter: Any, word: str) -> None:
    with enter():
        problem = mode_problem()
    assert problem is not None and word in problem
    assert mode_problem() is None


def test_a_process_wide_forward_hook_is_named() -> None:
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert "forward hook" in (mode_problem() or "")
    finally:
        handle.remove()
    assert mode_problem() is None


def test_the_blueprints_own_form_passes_and_each_difference_is_named() -> None:
    form = SeedForm.of(Scaled().eval())
    assert form.problem(Scaled().eval()) is None  # other weights, same form

    sub = Subclass().eval()
    assert "Subclass" in (form.problem(sub) or "")

    hooked = Scaled().eval()
    hooked.fc.register_forward_hook(lambda m, i, o: o * 2)
    assert "forward hooks" in (form.problem(hooked) or "")

    rescaled = Scaled().eval()
    rescaled.scaling = 3.0
    assert "'scaling'" in (form.problem(rescaled) or "")

    training = Scaled().train()
    assert "training mode" in (form.problem(training) or "")
    assert form.problem(training, training=True) is None

    extra = Scaled().eval()
    extra.fc.extra = torch.nn.ReLU()
    assert "submodules" in (form.problem(extra) or "")
