"""The content hash that decides whether a blueprint must be compiled again.

It covers what the compiled artifact depends on: the artifact kind, the declaration, the source files of the
blueprint and of the module's classes, the weights, the compile settings, the shape profile and the version of
the kind's pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint, Dim
from esper.provenance import digest_files, source_files

# Bump a kind's version when Tezzeret's output for the same input changes (a new guard field, different
# export options, another training artifact layout): the content hash covers it, so old entries are not reused.
PIPELINE_VERSIONS: dict[ArtifactKind, str] = {
    ArtifactKind.INFERENCE: "tezzeret/1",
    ArtifactKind.TRAINING: "tezzeret-training/3",
}


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


def source_digest(bp: Blueprint, module: torch.nn.Module) -> str:
    """The digest of every file whose text decides what ``module`` computes (the declaring file and the files
    of its classes, torch's excluded): :func:`esper.provenance.digest_files`, one implementation shared with
    Kasmina's stale check."""
    return digest_files(source_files(bp, module))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_hash(
    bp: Blueprint,
    module: torch.nn.Module,
    *,
    artifact: ArtifactKind | str,
    settings: Mapping[str, Any],
    ranges: Mapping[str, tuple[int, int]],
    device: str,
) -> str:
    """The identity of what Tezzeret would produce for ``bp`` built as ``module``: equal hashes, same artifact."""
    kind = ArtifactKind(artifact)
    meta = {
        "artifact": kind.value,
        "pipeline": PIPELINE_VERSIONS[kind],
        "declaration": declaration(bp),
        "settings": dict(settings),
        "ranges": {k: list(v) for k, v in ranges.items()},
        "device": device,
        "sources": source_digest(bp, module),
        "weights": weights_digest(module),
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
