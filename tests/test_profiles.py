"""Exact-size specializations as declarations: profile names (old ones still read), hot sizes, the candidates."""

from __future__ import annotations

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind, profile_ranges, spec
from esper.artifacts.validate import PROFILE_RE
from esper.blueprint import Blueprint, BlueprintError, Dim, Input
from esper.profiles import is_specialization, joint_specializations, specialization_name, split_profile


def bp(hot: tuple[int, ...] = ()) -> Blueprint:
    return Blueprint(
        name="rnn",
        version=1,
        build=lambda: torch.nn.Identity(),
        inputs=(Input("x", "float32", (Dim("batch", 1, 16), Dim("seq", 2, 96, hot=hot), 4)),),
        representative=({"batch": 2, "seq": 16}, {"batch": 8, "seq": 64}),
        buckets={"batch": [(1, 4), (5, 16)]},
    )


@pytest.mark.parametrize("name", ["default", "batch=1-4", "batch=1-4,seq=2-96", "default@seq=32", "batch=1-4@seq=32"])
def test_profile_names_old_and_new_are_valid(name: str) -> None:
    assert PROFILE_RE.fullmatch(name)


@pytest.mark.parametrize("name", ["default@", "default@seq=1-2", "default@seq", "@seq=3", "default@seq=3@b=2", "x"])
def test_malformed_profile_names_are_refused(name: str) -> None:
    assert not PROFILE_RE.fullmatch(name)


def test_a_specialization_name_round_trips() -> None:
    name = specialization_name("batch=1-4", {"seq": 32})
    assert name == "batch=1-4@seq=32" and is_specialization(name)
    assert split_profile(name) == ("batch=1-4", {"seq": 32})
    assert split_profile("batch=1-4") == ("batch=1-4", {}) and not is_specialization("batch=1-4")


def test_hot_sizes_are_validated() -> None:
    assert Dim("seq", 2, 96, hot=(64, 32)).hot == (32, 64)
    for hot in ((1,), (97,), (32, 32), (True,), (3.0,)):
        with pytest.raises(BlueprintError, match="hot"):
            Dim("seq", 2, 96, hot=hot)  # type: ignore[arg-type]


def test_specializations_are_each_profiles_representative_and_hot_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_TRAINING_SPECIALIZATIONS", "1")  # training's are opt-in
    profiles = spec(ArtifactKind.INFERENCE).specializations(bp(hot=(32,)))
    # Per bucket profile, per dim: the sizes inside it (batch 2 lies in 1-4, batch 8 in 5-16; seq in both).
    assert list(profiles) == [
        "batch=1-4@batch=2",
        "batch=1-4@seq=16",
        "batch=1-4@seq=32",
        "batch=1-4@seq=64",
        "batch=5-16@batch=8",
        "batch=5-16@seq=16",
        "batch=5-16@seq=32",
        "batch=5-16@seq=64",
    ]
    assert profiles["batch=5-16@seq=32"] == {"batch": (5, 16), "seq": (32, 32)}
    assert profile_ranges(bp(hot=(32,)), "batch=1-4@seq=32") == {"batch": (1, 4), "seq": (32, 32)}
    # Training covers the whole range in one artifact: its specializations hold dims of the whole range at the
    # measured shapes' own sizes (hot sizes included), never per bucket and never the sizes' cross product.
    training = spec(ArtifactKind.TRAINING).specializations(bp(hot=(32,)))
    assert list(training) == [
        "default@batch=2",
        "default@batch=8",
        "default@seq=16",
        "default@seq=64",
        "default@seq=32",
        "default@batch=2,seq=16",
        "default@batch=8,seq=64",
        "default@batch=2,seq=32",
        "default@batch=8,seq=32",
    ]
    assert training["default@batch=8,seq=32"] == {"batch": (8, 8), "seq": (32, 32)}
    assert training["default@seq=64"] == {"batch": (1, 16), "seq": (64, 64)}


def test_a_size_that_is_neither_representative_nor_hot_is_no_profile() -> None:
    with pytest.raises(ValueError, match="no shape profile"):
        profile_ranges(bp(), "batch=1-4@seq=33")
    with pytest.raises(ValueError, match="no shape profile"):
        profile_ranges(bp(), "batch=1-4@batch=8")  # outside the bucket


def test_hot_sizes_are_measured_at_the_representative_shapes() -> None:
    shapes = bp(hot=(32,)).measured_shapes()
    assert shapes[:2] == [{"batch": 2, "seq": 16}, {"batch": 8, "seq": 64}]
    assert shapes[2:] == [{"batch": 2, "seq": 32}, {"batch": 8, "seq": 32}]
    assert bp().measured_shapes() == [{"batch": 2, "seq": 16}, {"batch": 8, "seq": 64}]


def test_layouts_are_each_inputs_dims_after_its_leading_one() -> None:
    batch, seq, height, width = Dim("batch", 1, 8), Dim("seq", 2, 16), Dim("height", 4, 8), Dim("width", 4, 8)
    bp = Blueprint(
        name="layouts",
        version=1,
        build=lambda: torch.nn.Identity(),
        inputs=(Input("x", "float32", (batch, 3, height, width)), Input("t", "float32", (seq, batch))),
        representative=({"batch": 2, "seq": 4, "height": 4, "width": 4},),
    )
    # batch leads x, so shares no stride there; in t it follows seq, whose size enters no stride.
    assert bp.layouts() == [frozenset({"height", "width"}), frozenset({"batch"})]


def test_joint_specializations_hold_each_group_together_all_or_none() -> None:
    ranges = {"batch": (2, 4), "height": (6, 12), "width": (6, 12)}
    shape = {"batch": 2, "height": 8, "width": 8}
    every = joint_specializations({"default": ranges}, [shape])
    grouped = joint_specializations({"default": ranges}, [shape], together=[{"height", "width"}])
    assert len(every) == 7  # the clean twin: every set of the three dims
    assert list(grouped) == ["default@batch=2", "default@height=8,width=8", "default@batch=2,height=8,width=8"]
    # A group whose other dims are not dynamic in the profile binds only its dynamic ones.
    narrow = {**ranges, "height": (8, 8)}
    assert "default@width=8" in joint_specializations({"default": narrow}, [shape], together=[{"height", "width"}])
