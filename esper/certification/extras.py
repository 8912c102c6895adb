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
# The modules certifying imports beyond the runtime, with the distribution that provides each: hypothesis draws
# the parity cases. Latency is timed by certification's own interleaved timer, so pytest-benchmark is not one of
# them; pytest is, for ``pytest --certify`` only, and is already running when the plugin asks.
HARNESS = {"hypothesis": "hypothesis"}


def importable(module: str) -> bool:
    """Whether ``module`` imports (a missing or broken install does not)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_library(can_import: Callable[[str], bool] = importable) -> list[str]:
    """The distributions certifying (``esper certify`` or ``pytest --certify``) needs and cannot import here,
    in :data:`HARNESS` order."""
    return [dist for module, dist in HARNESS.items() if not can_import(module)]


def usage_error(missing: list[str]) -> str:
    """The message ``pytest --certify`` stops with when ``missing`` is not empty."""
    return f"pytest --certify needs {', '.join(missing)}, the certification harness's dependencies: {INSTALL}"
