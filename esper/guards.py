"""The guard schema: which inputs a compiled artifact accepts, and the per-call check Kasmina runs.

AOTInductor code does not check its inputs (unless ``AOTI_RUNTIME_CHECK_INPUTS=1`` was set at compile time):
a wrong feature size silently runs and reads out of bounds. This check is what stands between a training
run and garbage, so it is exact: dtype, rank, device, every fixed dim, every dynamic range, and equality of
dims that share a name. The schema is plain, versioned, frozen data, written by Tezzeret from the exported
program and stored in Urza as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

GUARD_SCHEMA_VERSION = 1


class SchemaVersionError(ValueError):
    """Data written by a newer Esper: refuse it rather than guess."""


@dataclass(frozen=True)
class DimGuard:
    """One dim: fixed (``size``) or dynamic (``name`` in ``[min, max]``)."""

    size: int | None = None
    name: str | None = None
    min: int | None = None
    max: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.name is not None

    def describe(self) -> str:
        return f"{self.name}({self.min}..{self.max})" if self.dynamic else str(self.size)


@dataclass(frozen=True)
class InputGuard:
    """What one positional input must be."""

    name: str
    dtype: str
    dims: tuple[DimGuard, ...]

    @property
    def rank(self) -> int:
        return len(self.dims)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(d.describe() for d in self.dims)}]"


@dataclass(frozen=True)
class GuardSchema:
    """Every input's guard, the device the artifact runs on, and export's range constraints (as text)."""

    inputs: tuple[InputGuard, ...]
    device: str = "cpu"
    range_constraints: dict[str, str] = field(default_factory=dict)
    version: int = GUARD_SCHEMA_VERSION

    def describe(self) -> str:
        return "; ".join(i.describe() for i in self.inputs) + f" on {self.device}"

    def dim_ranges(self) -> dict[str, tuple[int, int]]:
        """Each dynamic dim's inclusive range, by name."""
        out: dict[str, tuple[int, int]] = {}
        for i in self.inputs:
            for d in i.dims:
                if d.dynamic:
                    assert d.name is not None and d.min is not None and d.max is not None
                    out.setdefault(d.name, (d.min, d.max))
        return out

    def shapes(self, sizes: dict[str, int]) -> tuple[tuple[int, ...], ...]:
        """Concrete input shapes for one assignment of the dynamic dims."""
        return tuple(tuple(sizes[d.name] if d.dynamic else d.size for d in i.dims) for i in self.inputs)  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "device": self.device,
            "range_constraints": dict(self.range_constraints),
            "inputs": [
                {
                    "name": i.name,
                    "dtype": i.dtype,
                    "dims": [
                        {"name": d.name, "min": d.min, "max": d.max} if d.dynamic else {"size": d.size} for d in i.dims
                    ],
                }
                for i in self.inputs
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardSchema:
        version = int(data.get("version", 0))
        if version > GUARD_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"guard schema version {version} is newer than this Esper understands ({GUARD_SCHEMA_VERSION})"
            )
        return cls(
            inputs=tuple(
                InputGuard(i["name"], i["dtype"], tuple(DimGuard(**d) for d in i["dims"])) for i in data["inputs"]
            ),
            device=data["device"],
            range_constraints=dict(data.get("range_constraints", {})),
            version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> GuardSchema:
        return cls.from_dict(json.loads(text))


def explain(schema: GuardSchema) -> Callable[[Sequence[Any]], str | None]:
    """The readable check: ``None`` when ``schema`` accepts the inputs, else the first reason it does not."""
    specs = tuple(
        (
            i.name,
            getattr(torch, i.dtype),
            i.rank,
            tuple((k, d.size, d.name, d.min, d.max) for k, d in enumerate(i.dims)),
        )
        for i in schema.inputs
    )
    n_inputs = len(specs)
    device_type = torch.device(schema.device).type

    def check(args: Sequence[Any]) -> str | None:
        if len(args) != n_inputs:
            return f"expected {n_inputs} inputs, got {len(args)}"
        bound: dict[str, int] = {}
        for x, (name, dtype, rank, dims) in zip(args, specs, strict=True):
            if not isinstance(x, torch.Tensor):
                return f"input {name!r} is a {type(x).__name__}, not a Tensor"
            if x.dtype != dtype:
                return f"input {name!r} has dtype {x.dtype}, guard requires {dtype}"
            if x.device.type != device_type:
                return f"input {name!r} is on {x.device}, guard requires {device_type}"
            shape = x.shape
            if len(shape) != rank:
                return f"input {name!r} has rank {len(shape)}, guard requires {rank}"
            for k, size, dname, lo, hi in dims:
                s = shape[k]
                if dname is None:
                    if s != size:
                        return f"input {name!r} dim {k} is {s}, guard requires {size}"
                elif s < lo or s > hi:
                    return f"input {name!r} dim {k} ({dname}) is {s}, outside guard range [{lo}, {hi}]"
                elif bound.setdefault(dname, s) != s:
                    return f"input {name!r} dim {k} ({dname}) is {s}, but {dname} is {bound[dname]} elsewhere"
        return None

    return check


def _predicate_source(schema: GuardSchema) -> str:
    """Python source of a straight-line predicate for ``schema``: no loops, every constant inlined."""
    device_attr = {"cpu": "is_cpu", "cuda": "is_cuda"}.get(torch.device(schema.device).type)
    lines = ["def accepts(args):", f"    if len(args) != {len(schema.inputs)}:", "        return False"]
    first_seen: dict[str, str] = {}
    for n, inp in enumerate(schema.inputs):
        lines += [
            f"    x{n} = args[{n}]",
            f"    if not isinstance(x{n}, Tensor) or x{n}.dtype is not {inp.dtype}:",
            "        return False",
        ]
        if device_attr is None:
            lines += [f"    if x{n}.device.type != {torch.device(schema.device).type!r}:", "        return False"]
        else:
            lines += [f"    if not x{n}.{device_attr}:", "        return False"]
        lines += [f"    s{n} = x{n}.shape", f"    if len(s{n}) != {inp.rank}:", "        return False"]
        for k, d in enumerate(inp.dims):
            v = f"s{n}[{k}]"
            if not d.dynamic:
                lines += [f"    if {v} != {d.size}:", "        return False"]
            elif d.name in first_seen:
                lines += [f"    if {v} != {first_seen[d.name]}:", "        return False"]
            else:
                first_seen[d.name] = v
                lines += [f"    if not {d.min} <= {v} <= {d.max}:", "        return False"]
    lines.append("    return True")
    return "\n".join(lines)


def compile_predicate(schema: GuardSchema) -> Callable[[Sequence[Any]], bool]:
    """A predicate generated for ``schema``: straight-line code with every constant inlined (about half a
    microsecond for one input). Kasmina runs it on every call."""
    namespace: dict[str, Any] = {"Tensor": torch.Tensor, **{i.dtype: getattr(torch, i.dtype) for i in schema.inputs}}
    exec(compile(_predicate_source(schema), f"<guards {schema.describe()}>", "exec"), namespace)
    return namespace["accepts"]


def compile_check(schema: GuardSchema) -> Callable[[Sequence[Any]], str | None]:
    """Build the per-call check for ``schema``: it returns ``None`` when the inputs are accepted, else why not.

    Kasmina runs this on every call, so the accepting path is a predicate generated for this schema (about a
    microsecond); only a refusal pays for :func:`explain` to say why.
    """
    accepts = compile_predicate(schema)
    why = explain(schema)

    def check(args: Sequence[Any]) -> str | None:
        if accepts(args):
            return None
        return why(args) or "refused by the guard predicate"

    return check
