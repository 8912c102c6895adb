"""The artifact-kind specification (esper.artifacts.kinds): each kind's candidates, ranges and opt-out,
written out here by hand, and the one candidate rule that Tezzeret compiles and certification plans by."""

from __future__ import annotations

import pytest

from esper.artifacts.kinds import SPECS, ArtifactKind, Candidate, spec
from esper.artifacts.variants import VARIANTS, Variant
from esper.blueprint import Blueprint, Dim, Input
from esper.certification import plan
from esper.certification.kinds import KINDS
from esper.kasmina.kinds import InferenceLoader, TrainingLoader
from esper.tezzeret.compiler import PIPELINES


def bucketed() -> Blueprint:
    return Blueprint(
        name="b",
        version=1,
        build=lambda: None,
        inputs=(Input("x", "float32", (Dim("batch", 1, 64), Dim("seq", 2, 16))),),
        representative=({"batch": 2, "seq": 4}, {"batch": 8, "seq": 4}),
        buckets={"batch": [(1, 4), (5, 64)]},
        variants=("freezing_autotune_cpp", "default"),
    )


def test_every_kind_has_one_spec() -> None:
    assert set(SPECS) == set(ArtifactKind)
    assert all(spec(k).kind is k and spec(k.value) is spec(k) for k in ArtifactKind)


def test_inference_candidates_are_every_profile_under_the_declared_variants_in_their_order() -> None:
    s, bp = spec(ArtifactKind.INFERENCE), bucketed()
    buckets = {
        "batch=1-4": {"batch": (1, 4), "seq": (2, 16)},
        "batch=5-64": {"batch": (5, 64), "seq": (2, 16)},
    }
    # The bucket profiles first, then their exact-size specializations (compiled only where export holds a dim).
    assert list(s.profiles(bp))[:2] == list(buckets)
    assert s.profiles(bp) == {**buckets, **s.specializations(bp)}
    assert s.candidates(bp)[:4] == [
        ("batch=1-4", "freezing_autotune_cpp"),
        ("batch=1-4", "default"),
        ("batch=5-64", "freezing_autotune_cpp"),
        ("batch=5-64", "default"),
    ]
    # Each specialization under the first variant only.
    assert s.candidates(bp)[4:] == [Candidate(p, "freezing_autotune_cpp") for p in s.specializations(bp)]
    assert s.ranges(bp, "batch=5-64", VARIANTS["freezing_autotune_cpp"]) == {"batch": (5, 64), "seq": (2, 16)}
    with pytest.raises(ValueError, match="no shape profile 'default'"):
        s.ranges(bp, "default", VARIANTS["default"])


def test_training_is_the_whole_range_under_the_default_variant_then_its_measured_shapes_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s, bp = spec(ArtifactKind.TRAINING), bucketed()
    # Training specializations are candidates only when switched on.
    monkeypatch.delenv("ESPER_TRAINING_SPECIALIZATIONS", raising=False)
    assert [c.id for c in s.candidates(bp)] == ["default/default"]
    monkeypatch.setenv("ESPER_TRAINING_SPECIALIZATIONS", "1")
    assert s.candidates(bp)[0] == Candidate("default", "default")
    # Then the specializations: each set of dims held at a representative shape's own sizes, fewest dims first,
    # never the bucket profiles (a training artifact covers the whole range).
    assert [c.id for c in s.candidates(bp)] == [
        "default/default",
        "default@batch=2/default",
        "default@batch=8/default",
        "default@seq=4/default",
        "default@batch=2,seq=4/default",
        "default@batch=8,seq=4/default",
    ]
    assert s.ranges(bp, "default", VARIANTS["default"]) == {"batch": (1, 64), "seq": (2, 16)}
    assert s.ranges(bp, "default@batch=8,seq=4", VARIANTS["default"]) == {"batch": (8, 8), "seq": (4, 4)}
    assert s.ranges(bp, "default@seq=4", VARIANTS["default"]) == {"batch": (1, 64), "seq": (4, 4)}
    with pytest.raises(ValueError, match="whole declared range"):
        s.ranges(bp, "batch=1-4", VARIANTS["default"])
    # A combination of sizes no representative shape has is no specialization.
    with pytest.raises(ValueError, match="whole declared range"):
        s.ranges(bp, "default@batch=2,seq=5", VARIANTS["default"])
    with pytest.raises(ValueError, match="'default' variant only"):
        s.ranges(bp, "default", VARIANTS["freezing_autotune_cpp"])
    # A variant that calls itself default but folds the weights is not the default variant.
    with pytest.raises(ValueError, match="'default' variant only"):
        s.ranges(bp, "default", Variant("default", {"freezing": True}, swappable=False))


@pytest.mark.parametrize("kind", list(ArtifactKind))
def test_tezzeret_compiles_the_candidates_certification_plans(kind: ArtifactKind) -> None:
    bp = bucketed()
    compiled = [f"{p}/{v.name}" for p, v in PIPELINES[kind].candidates(bp)]
    assert compiled == plan.candidate_ids(bp, kind)
    for p, v in PIPELINES[kind].candidates(bp):
        assert PIPELINES[kind].ranges(bp, p, v) == plan.profiles(bp, kind)[p]


def test_the_layers_read_their_facts_from_the_spec() -> None:
    assert PIPELINES[ArtifactKind.INFERENCE].compile_check == "compile"
    assert PIPELINES[ArtifactKind.TRAINING].compile_check == "train_compile"
    assert (InferenceLoader.kind, TrainingLoader.kind) == (ArtifactKind.INFERENCE, ArtifactKind.TRAINING)
    assert [spec(k).noun for k in ArtifactKind] == ["entry", "training entry"]
    assert [spec(k).guarded_eager for k in ArtifactKind] == [True, False]
    assert all(KINDS[k].artifact is k for k in ArtifactKind)


@pytest.mark.parametrize(("value", "off"), [(None, False), ("1", False), ("0", True), (" Off ", True), ("no", True)])
def test_training_certification_can_be_switched_off(
    monkeypatch: pytest.MonkeyPatch, value: str | None, off: bool
) -> None:
    if value is None:
        monkeypatch.delenv("ESPER_CERTIFY_TRAINING", raising=False)
    else:
        monkeypatch.setenv("ESPER_CERTIFY_TRAINING", value)
    training, inference = spec(ArtifactKind.TRAINING), spec(ArtifactKind.INFERENCE)
    assert training.disabled() == ("training certification is off (ESPER_CERTIFY_TRAINING=0)" if off else None)
    assert inference.disabled() is None
