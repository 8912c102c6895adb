"""Weight schemas: the name, shape and dtype of each tensor an artifact expects.

A leaf module (it imports only torch) so that Kasmina's loader, its seed binding, the training artifact
format and Tezzeret can all speak of weight schemas without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


class WeightSchemaError(ValueError):
    """A seed's weights do not match the artifact's weight schema; the message names the tensor."""


# Every dtype by its stored name ("float32"): stored names are looked up here, never with getattr on torch.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def torch_dtype(name: str) -> torch.dtype:
    """The dtype a stored name (``"float32"``) stands for; :class:`WeightSchemaError` for any other text."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WeightSchemaError(f"{name!r} is not a torch dtype")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype (``"float32"``) of one weight."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorSpec:
        """The spec of tensor ``t`` under ``name``."""
        return cls(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def describe(self) -> str:
        """``"float32[4, 8]"``: for messages."""
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"

    def to_dict(self) -> dict[str, Any]:
        """Shape and dtype as JSON-ready values (the name is the caller's key)."""
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> TensorSpec:
        """The inverse of :meth:`to_dict`."""
        dtype = str(data["dtype"])
        torch_dtype(dtype)  # refuse what is no dtype here, not at the first call
        return cls(name, tuple(int(s) for s in data["shape"]), dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return torch_dtype(self.dtype)


def schema_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The weight schema of a state dict."""
    return {n: TensorSpec.of(n, t) for n, t in state.items()}
