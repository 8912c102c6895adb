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


# Every Inductor setting the lever study (benchmarks/levers.py, issue 14) measures, by name: the one place
# that maps a lever to its settings. What certification compiles is VARIANTS below, a subset chosen by the
# study's figures on a quiet machine: adopting a lever is adding its name to SERVED.
CANDIDATES: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("default", {}),
        # Constant-folds the weights into the graph and pre-packs them for the GEMM library.
        Variant("freezing", {"freezing": True}, swappable=False),
        # The AOTInductor wrapper (AOTInductorModel::run_impl) is built at -O1 by default; a tiny kernel's
        # call is mostly wrapper.
        Variant("wrapper_o2", {"aot_inductor.compile_wrapper_opt_level": "O2"}),
        Variant("wrapper_o3", {"aot_inductor.compile_wrapper_opt_level": "O3"}),
        # Link-time optimization of the package's shared library (Inductor applies it only with clang).
        Variant("wrapper_o3_lto", {"aot_inductor.compile_wrapper_opt_level": "O3", "aot_inductor.enable_lto": True}),
        # The C++ GEMM template against ATen, autotuned at compile time; needs constant weights (freezing).
        Variant(
            "freezing_autotune_cpp",
            {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
            swappable=False,
        ),
        # Weight-only subgraphs folded when the package loads (and again when a seed's weights are loaded),
        # so the weights stay swappable.
        Variant("runtime_constant_folding", {"aot_inductor.use_runtime_constant_folding": True}),
        # Inductor's OpenMP thread count: one thread (no fork/join per kernel) against the machine's default.
        Variant("threads_1", {"cpp.threads": 1}),
    )
}
SERVED = ("default", "freezing")
VARIANTS: dict[str, Variant] = {name: CANDIDATES[name] for name in SERVED}
DEFAULT_VARIANTS = tuple(VARIANTS)


def get(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown compile variant {name!r} (known: {', '.join(VARIANTS)})") from None
