"""The inputs a candidate's guards must refuse (esper.certification.cases): a pure function, tested on the
``meta`` device so that a case built on the default device instead of the certification's shows."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.certification.cases import refused_cases

GUARDS = GuardSchema(
    inputs=(
        InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=64), DimGuard(size=8))),
        InputGuard("mask", "float32", (DimGuard(name="batch", min=1, max=64),)),
    )
)


def on_meta(sizes: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
    # "meta" stands for any device that is not the default one (cuda:1 on a GPU machine).
    return (torch.zeros(sizes["batch"], 8, device="meta"), torch.zeros(sizes["batch"], device="meta"))


def test_every_case_is_on_the_certification_device() -> None:
    cases = refused_cases(GUARDS, {"batch": 4}, on_meta)
    assert cases
    for case in cases:
        assert all(t.device.type == "meta" for t in case.args), case.what


def test_a_fixed_dim_case_differs_from_an_accepted_input_only_in_that_dim() -> None:
    base = on_meta({"batch": 4})
    (case,) = [c for c in refused_cases(GUARDS, {"batch": 4}, on_meta) if c.what == "x dim 1 = 9"]
    bad, other = case.args
    assert bad.shape == (4, 9) and bad.dtype == base[0].dtype and bad.device == base[0].device
    assert other.shape == base[1].shape and other.dtype == base[1].dtype


def test_the_cases_named() -> None:
    whats = [c.what for c in refused_cases(GUARDS, {"batch": 4}, on_meta)]
    assert whats == [
        "batch=0 (below range)",
        "batch=65 (above range)",
        "x as torch.float64",
        "x with an extra dim",
        "x dim 1 = 9",
        "mask as torch.float64",
        "mask with an extra dim",
    ]


def test_no_case_below_size_zero() -> None:
    guards = GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=0, max=8), DimGuard(size=8))),))
    whats = [c.what for c in refused_cases(guards, {"batch": 4}, on_meta)]
    assert not any(w.startswith("batch=-1") for w in whats) and "batch=9 (above range)" in whats
