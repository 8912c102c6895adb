"""Where evidence came from: the machine, torch and the git commit, stored beside every figure."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from typing import Any

import torch


@functools.cache
def git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_context() -> dict[str, Any]:
    """Torch version, CPU capability, host, cores and commit, as recorded with compile and benchmark figures."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_commit": git_commit(),
    }
