"""Compile variants: named sets of Inductor config overrides, each compiled into its own Urza entry.

No single setting wins everywhere on a 2-core CPU. In the lever study (benchmarks/levers.py, one quiet run,
each setting against eager interleaved at the catalog's 24 representative shapes) ``freezing_autotune_cpp``
(weights frozen into the graph, Inductor's C++ GEMM template autotuned against ATen at compile time) ran
0.21-0.36x eager at batch 2-8 of the GEMM blueprints, where ``default`` ran 0.51-0.67x, but lost to ``default``
at batch 64 and at 4 of 6 convolution shapes. Certification benchmarks every declared variant of every shape
profile and keeps a winner (see :mod:`esper.certification`), so a variant serves only where it pays.
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


# Every Inductor setting the lever study (benchmarks/levers.py) measures, by name: the one place
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
# What a blueprint compiles unless it declares ``variants``: the study's pick. Measured and not served by
# default (a blueprint may still declare any of them):
# - freezing: faster than default at 20 of 24 shapes, by more than 5% at 10 (ratios to eager, each measured
#   against eager on its own), and at 6 of those freezing_autotune_cpp was faster still. A cold certification
#   serving all three (2026-11-27) routed none of 11 profiles to it (a quiet one serving default and freezing,
#   1 of 11), and the third variant took that certification from 417 s to 724 s.
# - wrapper_o2/o3: g++ 12 crashes compiling the wrapper (an internal compiler error); wrapper_o3_lto: Inductor
#   applies LTO with clang only.
# - threads_1: geomean 0.73, slower than default at 15 of 24 shapes (1.35-1.58x eager at the larger
#   norm_act_chain and squeeze_excitation shapes).
# - runtime_constant_folding: geomean 0.62, within 10% of freezing at 20 of 24 shapes.
# - static (an exact-size export, a bucket of one size): geomean 0.51 at the 8 smallest shapes, where the
#   served variants' best is 0.34.
SERVED = ("default", "freezing_autotune_cpp")
# Every candidate is a variant a blueprint may declare; an entry's identity includes its name and settings.
VARIANTS: dict[str, Variant] = CANDIDATES
DEFAULT_VARIANTS = SERVED


def get(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown compile variant {name!r} (known: {', '.join(VARIANTS)})") from None
