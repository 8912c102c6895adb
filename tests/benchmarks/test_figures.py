"""The performance suite's reports render the issue-14 figures (floor, levers, training, seeds) from plain
figures, without measuring anything; and the lever study names only settings esper.artifacts.variants defines."""

from __future__ import annotations

from typing import Any

from benchmarks import figures, levers
from esper.artifacts import variants


def _shape(ratio: float, decision: str) -> dict[str, Any]:
    return {
        "ratio": ratio,
        "low": ratio * 0.9,
        "high": ratio * 1.1,
        "min_round": ratio * 0.8,
        "max_round": ratio * 1.2,
        "decision": decision,
        "rounds": 8,
        "candidate_ms": ratio,
        "eager_ms": 1.0,
        "max_abs_err": 0.0,
    }


def _p2(kasmina: float, default: float, warm: float, decision: str = "wins") -> dict[str, Any]:
    ratios = {"kasmina": kasmina, "kasmina_default": default, "compile_warm": warm}
    return {
        "eager": 2.0,
        "route": "compiled",
        # medians of other rounds than the ratios' (their quotient is not the figure)
        **{k: 2.4 * v for k, v in ratios.items()},
        "ratios": {
            k: {"ratio": v, "low": v * 0.9, "high": v * 1.1, "decision": decision if k == "kasmina" else "even"}
            for k, v in ratios.items()
        },
    }


FIGURES: dict[str, Any] = {
    "P2": {"a[batch=1]": _p2(0.5, 0.5, 1.0), "a[batch=8]": _p2(1.25, 1.0, 1.25, "loses")},
    "floor": {
        "blueprints": {
            "a": {
                "shape": {"batch": 1},
                "paths": {
                    k: {"us": v, "min_us": v, "max_us": v}
                    for k, v in {"raw": 10.0, "kernel": 11.5, "select": 0.8}.items()
                },
                "overhead_us": 1.5,
                "overhead_all_blocks_us": 2.5,
                "blocks": {"count": 40, "calls": 20, "quiet": 30},
                "target_us": 2.0,
                "meets_target": True,
                "guard_us": 0.75,
                "call_us": 0.5,
                "python_penalty_us": 0.25,
                "twin_us": 0.1,
                "twin_q1_us": -0.5,
                "twin_q3_us": 0.6,
            },
            "c": {
                "shape": {"batch": 2},
                "paths": {k: {"us": v, "min_us": v, "max_us": v} for k, v in {"raw": 9.0, "kernel": 10.0}.items()},
                "overhead_us": 1.0,
                "target_us": 2.0,
                "meets_target": True,
            },
            "b": {"shape": {"batch": 1}, "skipped": "this shape routes eager"},
        },
        "eager": {
            "a": {
                "shape": {"batch": 1},
                "paths": {"bare": {"us": 50.0}, "eager_route": {"us": 50.5}},
                "ratio": 1.01,
                "ratio_q1": 0.98,
                "ratio_q3": 1.04,
                "meets_target": True,
            },
            "b": {
                "shape": {"batch": 1},
                "paths": {"bare": {"us": 40.0}, "eager_route": {"us": 42.0}},
                "ratio": 1.05,
                "meets_target": False,
            },
        },
    },
    "levers": {
        "machine": "test",
        "mode": "quick",
        "blueprints": {
            "a": {
                "shapes": ["batch=1", "batch=8"],
                "levers": {
                    "default": {
                        "compile_s": {"dynamic": 3.0},
                        "shapes": {"batch=1": _shape(0.9, "even"), "batch=8": _shape(0.5, "wins")},
                    },
                    "wrapper_o3_lto": {"skipped": "needs clang"},
                },
            }
        },
    },
    "training": {
        "a": {"route": "compiled", "steps": {"batch=8": {"compiled_ms": 1, "eager_ms": 2, "ratio": 0.5}}},
        "conv": {"route": "eager", "reason": "dynamic height"},
    },
    "seeds": {
        "blueprint": "residual_mlp",
        "seeds": 100,
        "inference": {
            "switch_cost_ms": 0.12,
            "switch_cost_min_ms": 0.1,
            "switch_cost_max_ms": 0.2,
            "switch_call_ms": 0.3,
            "same_seed_call_ms": 0.18,
            "bind_ms_per_seed": 1.0,
            "rss_overhead_mb_per_seed": 0.01,
        },
    },
}


def test_perf_md_has_the_issue_14_sections() -> None:
    md = figures.markdown(FIGURES)
    assert "## Floor" in md
    assert (
        "| a | batch=1 | 10.00 | 11.50 | 1.50 (2.50) | 0.10 [-0.50-0.60] | 2.00 | 0.75 + 0.50 | 0.25 | 30 of 40 |"
    ) in md
    assert "| c | batch=2 | 9.00 | 10.00 | 1.00 | - | 2.00 | - | - | - |" in md  # a result from before the split
    assert "skipped: this shape routes eager" in md
    assert "## Lever study (quick mode" in md and "| default | 0.671 | 2 | 1 |" in md
    assert "wrapper_o3_lto skipped: needs clang" in md
    assert "| batch=8 | 0.50 [0.45-0.55]* |" in md  # the per-blueprint lever table
    assert "## Training step" in md and "| a | compiled | batch=8: 0.50 | 0.50 |" in md
    assert "| conv | eager | dynamic height |  |" in md
    assert "| inference | 0.12 [0.1-0.2] |" in md
    assert "| a[batch=8] | 2 | compiled | 1.25 [1.12-1.38]! | 1.00 | 1.00 |" in md
    head = figures.headline(FIGURES)
    assert abs(head["P2 Kasmina / eager, geomean"] - (1.25 * 0.5) ** 0.5) < 1e-12
    assert head["P2 Kasmina / eager, worst"] == 1.25
    assert head["P2 shapes where Kasmina is surely slower than eager"] == 1
    assert abs(head["P2 default variant alone / eager, geomean (before)"] - 0.5**0.5) < 1e-12
    assert abs(head["P2b Kasmina / warm torch.compile, geomean"] - 0.5**0.5) < 1e-12
    assert head["floor: Kasmina overhead above the raw runner, max us"] == 1.5
    assert head["floor: eager route / bare module, max ratio"] == 1.05
    assert head["floor: blueprints over the eager target"] == 1
    assert "| a | batch=1 | 50.00 | 50.50 | 1.010 [0.980-1.040] | met |" in md
    assert "| b | batch=1 | 40.00 | 42.00 | 1.050 | missed |" in md
    assert head["training step compiled / eager, geomean"] == 0.5
    assert head["seed switch (100 seeds, alternating every call), ms"] == 0.12


def test_the_lever_summary_lists_confident_wins_only() -> None:
    assert levers.summary(FIGURES["levers"]) == {"default": ["a[batch=8] 0.50"]}


def test_every_lever_names_a_candidate_variant_and_served_variants_are_candidates() -> None:
    for lever in levers.LEVERS.values():
        assert lever.variant in variants.CANDIDATES, lever
    assert variants.VARIANTS == variants.CANDIDATES  # a blueprint may declare any lever the study measures
    assert variants.DEFAULT_VARIANTS == variants.SERVED and set(variants.SERVED) <= set(variants.VARIANTS)
    for v in variants.CANDIDATES.values():  # settings freeze the weights only where the variant says so
        assert v.swappable == (not v.settings.get("freezing", False)), v.name


def test_the_seed_switch_cost_is_alternating_minus_repeating() -> None:
    import time

    from benchmarks.seeds_and_training import seed_switch

    last: list[int] = []

    def seed(k: int):  # type: ignore[no-untyped-def]
        def call(*x: object) -> None:
            if last and last[-1] != k:
                time.sleep(0.0005)  # a switch costs 0.5 ms here
            last.append(k)

        return call

    figures = seed_switch([seed(k) for k in range(4)], [], rounds=3)
    assert 0.3 <= figures["switch_cost_ms"] <= 5
    assert figures["same_seed_call_ms"] < figures["switch_call_ms"]
