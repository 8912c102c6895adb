"""Compile variants: named sets of Inductor config overrides, each compiled into its own Urza entry.

No single setting wins everywhere on a 2-core CPU: ``freezing`` (constant-folds the weights into the
compiled graph and pre-packs them for the GEMM library) is ~0.4-0.5x eager at batch 8-64 but can be slower
than eager at batch 1. Certification benchmarks every variant of every shape profile and keeps the winner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EAGER_ROUTE = "eager"


@dataclass(frozen=True)
class Variant:
    """A named set of Inductor config overrides; part of an entry's identity. ``swappable`` says whether the
    package's weights can be replaced after loading (freezing folds them into the code)."""

    name: str = "default"
    settings: Mapping[str, Any] = field(default_factory=dict)
    swappable: bool = True


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("default", {}),
        Variant("freezing", {"freezing": True}, swappable=False),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)


def get(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown compile variant {name!r} (known: {', '.join(VARIANTS)})") from None
