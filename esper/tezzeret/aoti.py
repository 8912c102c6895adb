"""AOTInductor: the exported program to a ``.pt2`` package, with a persistent Inductor cache.

Why AOTInductor and not ``torch.compile``: a ``torch.compile`` wrapper cannot be saved, so every process
would compile again (seconds per blueprint). ``torch._inductor.aoti_compile_and_package`` runs the same
Inductor backend ahead of time and writes a self-contained package that a process loads in milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.export import ExportedProgram

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_persistent_cache(folder: Path) -> Path:
    """Point Inductor's cache at ``folder`` unless the user already chose one; returns the folder in use."""
    if CACHE_ENV not in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(folder)
    return Path(os.environ[CACHE_ENV])


def compile_package(ep: ExportedProgram, path: Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Compile ``ep`` into the package file ``path`` with Inductor config overrides ``settings``."""
    import torch._inductor

    out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=dict(settings or {}))
    return Path(out)
