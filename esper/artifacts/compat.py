"""The compatibility key: which processes may load an artifact.

A compiled package holds native code built for one torch ABI, one OS/architecture and one CPU ISA (or CUDA
capability). Loading an AVX-512 ``.so`` on a host without AVX-512 dies with SIGILL (pytorch#121516), which no
Python ``try`` can catch, so an entry is only ever loaded by a process whose key is equal.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CompatKey:
    """torch version, OS-architecture, ISA (CPU capability or CUDA ``sm_XY``) and device type."""

    torch_version: str
    platform: str
    isa: str
    device_type: str

    def __str__(self) -> str:
        return f"torch-{self.torch_version}/{self.platform}/{self.isa}/{self.device_type}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def mismatch(self, other: CompatKey) -> str | None:
        """Why an artifact built under ``other`` cannot load here (``self``), or ``None`` if it can."""
        diffs = [
            f"{k} {getattr(other, k)!r} != this process's {getattr(self, k)!r}"
            for k in ("torch_version", "platform", "isa", "device_type")
            if getattr(self, k) != getattr(other, k)
        ]
        return "; ".join(diffs) or None


def current(device: str | torch.device = "cpu") -> CompatKey:
    """This process's key for artifacts that run on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        isa = f"sm_{major}{minor}"
    else:
        isa = torch.backends.cpu.get_cpu_capability()
    return CompatKey(
        torch_version=torch.__version__,
        platform=f"{platform.system().lower()}-{platform.machine()}",
        isa=isa,
        device_type=dev.type,
    )
