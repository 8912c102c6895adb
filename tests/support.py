"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class CountingOps(TorchDispatchMode):
    """Counts every aten op it sees: a mode that eager runs through and compiled code would bypass."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))
