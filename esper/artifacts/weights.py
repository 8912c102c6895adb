"""Eager fallback weights, saved with safetensors so that loading them runs no pickled code."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "esper-weights/1"


def save_state(module: torch.nn.Module, path: Path, *, blueprint: str, version: int) -> None:
    """Write ``module``'s state dict, tagged with the blueprint that rebuilds it."""
    # Clones break shared storage, which safetensors refuses to write (tied weights).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "blueprint": blueprint, "version": str(version)})


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_state`."""
    return load_file(str(path))
