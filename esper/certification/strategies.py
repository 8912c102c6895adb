"""Hypothesis strategies over a blueprint's guards: shapes inside the ranges, and input values.

Values are described by a small :class:`~esper.numerics.inputs.Regime` (scale, zeros, seed) that hypothesis draws
and shrinks; :func:`esper.numerics.inputs.make_inputs` turns it into tensors with a seeded torch generator. Drawing
whole tensors element by element through hypothesis would be slow and shrink badly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from esper.numerics.inputs import Regime

Ranges = Mapping[str, tuple[int, int]]

PROFILE_ENV = "ESPER_HYPOTHESIS_PROFILE"
# Drawn cases come on top of the planned ones (esper.certification.plan.parity_cases), which cover every size
# of each dim and the value regimes: a few draws explore combinations the plan does not name.
settings.register_profile(
    "esper-ci",
    max_examples=5,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "esper-local",
    max_examples=10,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hypothesis_settings() -> settings:
    """``esper-ci`` (derandomized, no deadline) under CI or when chosen by ``ESPER_HYPOTHESIS_PROFILE``;
    otherwise ``esper-local``, which explores more."""
    name = os.environ.get(PROFILE_ENV) or ("esper-ci" if os.environ.get("CI") else "esper-local")
    return settings.get_profile(name)


def sizes(ranges: Ranges) -> st.SearchStrategy[dict[str, int]]:
    """A size for every dynamic dim, inside its range."""
    return st.fixed_dictionaries({n: st.integers(lo, hi) for n, (lo, hi) in ranges.items()})


def regimes() -> st.SearchStrategy[Regime]:
    """Normal magnitudes, tiny and large ones, with no, some or all exact zeros."""
    return st.builds(
        Regime,
        scale=st.sampled_from([1.0, 1e-3, 1e3]),
        zeros=st.sampled_from(["none", "some", "all"]),
        seed=st.integers(0, 2**31 - 1),
    )


EDGE_REGIMES = (Regime(), Regime(scale=1e3, zeros="some", seed=1), Regime(zeros="all", seed=2))


def check_cases(check: Callable[[dict[str, int], Regime], None], ranges: Ranges, edges: list[dict[str, int]]) -> None:
    """Run ``check`` on hypothesis-drawn sizes and regimes inside ``ranges``, always including every edge
    shape under each of :data:`EDGE_REGIMES` as explicit examples."""

    @given(sizes=sizes(ranges), regime=regimes())
    @hypothesis_settings()
    def case(sizes: dict[str, int], regime: Regime) -> None:
        check(sizes, regime)

    for edge in reversed(edges):
        for regime in reversed(EDGE_REGIMES):
            case = example(sizes=edge, regime=regime)(case)
    case()
