"""Esper's compile pipeline: Tezzeret compiles blueprints ahead of time, Urza stores them, Kasmina loads them,
and certification decides which compiled route each profile may serve.

The public API is the names below (``from esper import Blueprint, Kasmina``) and the modules they come from:

- :mod:`esper.blueprint` and :mod:`esper.catalog`: declaring blueprints (:class:`Blueprint`, :class:`Dim`,
  :class:`Input`, :class:`Tolerance`, :class:`Budget`, :func:`seeded`) and loading folders of them;
- :mod:`esper.tezzeret`: :class:`Tezzeret`, the ahead-of-time compiler;
- :mod:`esper.urza`: :class:`Urza`, the artifact store;
- :mod:`esper.kasmina`: :class:`Kasmina`, the runtime loader, and the kernels it returns;
- :mod:`esper.certification`: :class:`CertifySession`, one certification run (``esper certify`` and
  ``pytest --certify`` drive it).

Every other module is internal: reachable for tests and tools, but free to change between releases.

Importing :mod:`esper` imports nothing heavy: each name is imported on first use, so ``import esper`` costs
neither torch nor its compiler, and a training node that uses Kasmina never loads Tezzeret.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper.blueprint import Blueprint, BlueprintError, Budget, Dim, Input, Tolerance, seeded
    from esper.catalog import Catalog, load_catalog
    from esper.certification.session import CertifySession
    from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel, Route, TrainingKernel, Unusable
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first attribute access (PEP 562).
_SOURCES = {
    "Blueprint": "esper.blueprint",
    "BlueprintError": "esper.blueprint",
    "Budget": "esper.blueprint",
    "Dim": "esper.blueprint",
    "Input": "esper.blueprint",
    "Tolerance": "esper.blueprint",
    "seeded": "esper.blueprint",
    "Catalog": "esper.catalog",
    "load_catalog": "esper.catalog",
    "Tezzeret": "esper.tezzeret.compiler",
    "Urza": "esper.urza",
    "COMPILED": "esper.kasmina",
    "EAGER": "esper.kasmina",
    "Kasmina": "esper.kasmina",
    "Kernel": "esper.kasmina",
    "Route": "esper.kasmina",
    "TrainingKernel": "esper.kasmina",
    "Unusable": "esper.kasmina",
    "CertifySession": "esper.certification.session",
}

__all__ = [
    "COMPILED",
    "EAGER",
    "Blueprint",
    "BlueprintError",
    "Budget",
    "Catalog",
    "CertifySession",
    "Dim",
    "Input",
    "Kasmina",
    "Kernel",
    "Route",
    "Tezzeret",
    "Tolerance",
    "TrainingKernel",
    "Unusable",
    "Urza",
    "__version__",
    "load_catalog",
    "seeded",
]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'esper' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
