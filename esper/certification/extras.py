"""What ``pytest --certify`` needs beyond the runtime, and the message when it is missing.

``pip install esper`` is the runtime (Kasmina, the Urza reader, the CLI's read commands); the certification
harness's own dependencies come with ``pip install 'esper[certify]'``. The pytest plugin registers either way,
so a project with pytest but without the extra still runs its own tests; only ``--certify`` needs these.
Nothing here imports torch or the harness.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

INSTALL = "pip install 'esper[certify]'"
# The modules the harness imports, with the distribution that provides each.
HARNESS = {"hypothesis": "hypothesis", "pytest_benchmark": "pytest-benchmark"}
# What the library itself needs to certify (``esper certify``): hypothesis draws the parity cases.
LIBRARY = {"hypothesis": "hypothesis"}
# pytest-benchmark's pytest plugin name: installed but disabled (-p no:benchmark) is as good as missing.
BENCHMARK_PLUGIN = "benchmark"


def importable(module: str) -> bool:
    """Whether ``module`` imports (a missing or broken install does not)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_harness(has_plugin: Callable[[str], bool], can_import: Callable[[str], bool] = importable) -> list[str]:
    """The distributions ``pytest --certify`` needs and cannot use here, in :data:`HARNESS` order."""
    missing = [dist for module, dist in HARNESS.items() if not can_import(module)]
    if "pytest-benchmark" not in missing and not has_plugin(BENCHMARK_PLUGIN):
        missing.append("pytest-benchmark")
    return missing


def missing_library(can_import: Callable[[str], bool] = importable) -> list[str]:
    """The distributions ``esper certify`` needs and cannot import here (pytest is not one of them)."""
    return [dist for module, dist in LIBRARY.items() if not can_import(module)]


def usage_error(missing: list[str]) -> str:
    """The message ``pytest --certify`` stops with when ``missing`` is not empty."""
    return (
        f"pytest --certify needs {', '.join(missing)}, the certification harness's dependencies "
        f"(not installed, or their pytest plugin disabled with -p no:...): {INSTALL}"
    )
