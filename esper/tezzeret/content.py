"""The content hash that decides whether a blueprint must be compiled again.

It covers what the compiled artifact depends on: the declaration, the source files of the blueprint and of
the module's classes, the weights, the compile settings, the shape profile and this pipeline's version.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from esper.blueprint import Blueprint, Dim

# Bump when Tezzeret's output for the same input changes (a new guard field, different export options).
PIPELINE_VERSION = "tezzeret/1"


def declaration(bp: Blueprint) -> dict[str, Any]:
    """The declared contract as plain data."""
    return {
        "name": bp.name,
        "version": bp.version,
        "inputs": [
            {
                "name": i.name,
                "dtype": i.dtype,
                "shape": [{"dim": d.name, "min": d.min, "max": d.max} if isinstance(d, Dim) else d for d in i.shape],
                "low": i.low,
                "high": i.high,
            }
            for i in bp.inputs
        ],
        "representative": [dict(r) for r in bp.representative],
    }


def _source_files(bp: Blueprint, module: torch.nn.Module) -> list[Path]:
    files = {Path(bp.source)} if bp.source else set()
    torch_root = Path(torch.__file__).parent
    for sub in module.modules():
        try:
            f = inspect.getsourcefile(type(sub))
        except TypeError:
            continue
        if f and not Path(f).is_relative_to(torch_root):
            files.add(Path(f))
    return sorted(files)


def content_hash(
    bp: Blueprint,
    module: torch.nn.Module,
    *,
    settings: Mapping[str, Any],
    ranges: Mapping[str, tuple[int, int]],
    device: str,
) -> str:
    h = hashlib.sha256()
    meta = {
        "pipeline": PIPELINE_VERSION,
        "declaration": declaration(bp),
        "settings": dict(settings),
        "ranges": {k: list(v) for k, v in ranges.items()},
        "device": device,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for f in _source_files(bp, module):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
