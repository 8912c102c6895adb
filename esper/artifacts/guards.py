"""The guard schema: which inputs a compiled artifact accepts, and the per-call check Kasmina runs.

AOTInductor code does not check its inputs (unless ``AOTI_RUNTIME_CHECK_INPUTS=1`` was set at compile time):
a wrong feature size silently runs and reads out of bounds. This check is what stands between a training
run and garbage, so it is exact: a servable tensor (plain, strided, dense: see :mod:`esper.artifacts.servable`), dtype,
rank, device, every fixed dim, every dynamic range, and equality of dims that share a name. The schema is
plain, versioned, frozen data, written by Tezzeret from the exported program and stored in Urza as JSON.

Data is data: every field is validated when a schema is constructed (ints in range, dtypes from
:data:`esper.artifacts.validate.DTYPES`, names that are identifiers, ``min <= max``), so a schema read from a row can
only hold values the predicate generator may inline; anything else is an :class:`EntryFormatError`.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.artifacts.servable import WRAPPED_TEST, predicate_namespace, serving_problem, tensor_match
from esper.artifacts.validate import (
    DEVICE_TYPES,
    DTYPES,
    MAX_COUNT,
    MAX_SIZE,
    EntryFormatError,
    choice,
    identifier,
    integer,
    mapping,
    quote,
    sequence,
    text,
)

GUARD_SCHEMA_VERSION = 1
COLUMN = "guards"
#: The most dims one input may have (torch itself allows 64).
MAX_RANK = 64

#: Stored dtype name -> torch dtype. The only way a stored dtype becomes a torch object.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


class SchemaVersionError(ValueError):
    """Data written by a newer Esper: refuse it rather than guess."""


@dataclass(frozen=True)
class DimGuard:
    """One dim: fixed (``size``) or dynamic (``name`` in ``[min, max]``). Validated on construction."""

    size: int | None = None
    name: str | None = None
    min: int | None = None
    max: int | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            if self.min is not None or self.max is not None:
                raise EntryFormatError(COLUMN, f"a fixed dim has min/max ({self.min}, {self.max}) but no name")
            integer(self.size, COLUMN, "a fixed dim's size")
            return
        if self.size is not None:
            raise EntryFormatError(COLUMN, f"dim {quote(self.name)} is both fixed ({quote(self.size)}) and dynamic")
        identifier(self.name, COLUMN, "a dynamic dim's name")
        lo = integer(self.min, COLUMN, f"dim {self.name!r} min")
        hi = integer(self.max, COLUMN, f"dim {self.name!r} max")
        if lo > hi:
            raise EntryFormatError(COLUMN, f"dim {self.name!r}: min={lo} > max={hi}")

    @property
    def dynamic(self) -> bool:
        return self.name is not None

    def describe(self) -> str:
        return f"{self.name}({self.min}..{self.max})" if self.dynamic else str(self.size)

    @classmethod
    def from_dict(cls, data: Any) -> DimGuard:
        """Parse ``{"size": N}`` or ``{"name": ..., "min": ..., "max": ...}``."""
        d = mapping(data, COLUMN, "a dim", keys=("size", "name", "min", "max"))
        return cls(size=d.get("size"), name=d.get("name"), min=d.get("min"), max=d.get("max"))


@dataclass(frozen=True)
class InputGuard:
    """What one positional input must be. Validated on construction."""

    name: str
    dtype: str
    dims: tuple[DimGuard, ...]

    def __post_init__(self) -> None:
        identifier(self.name, COLUMN, "an input's name")
        choice(self.dtype, DTYPES, COLUMN, f"input {self.name!r} dtype")
        dims = tuple(sequence(self.dims, COLUMN, f"input {self.name!r} dims", limit=MAX_RANK))
        if not all(isinstance(d, DimGuard) for d in dims):
            raise EntryFormatError(COLUMN, f"input {self.name!r} dims must be DimGuard values")
        object.__setattr__(self, "dims", dims)

    @property
    def rank(self) -> int:
        return len(self.dims)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(d.describe() for d in self.dims)}]"


@dataclass(frozen=True)
class GuardSchema:
    """Every input's guard, the device the artifact runs on, and export's range constraints (as text, never
    evaluated). Validated on construction: unique input names, one range per dim name, a known device."""

    inputs: tuple[InputGuard, ...]
    device: str = "cpu"
    range_constraints: dict[str, str] = field(default_factory=dict)
    version: int = GUARD_SCHEMA_VERSION

    def __post_init__(self) -> None:
        inputs = tuple(sequence(self.inputs, COLUMN, "inputs"))
        if not all(isinstance(i, InputGuard) for i in inputs):
            raise EntryFormatError(COLUMN, "inputs must be InputGuard values")
        object.__setattr__(self, "inputs", inputs)
        names = [i.name for i in inputs]
        if len(set(names)) != len(names):
            raise EntryFormatError(COLUMN, f"input names repeat: {names}")
        choice(self.device, DEVICE_TYPES, COLUMN, "device")
        version = integer(self.version, COLUMN, "version", hi=MAX_SIZE)
        if version > GUARD_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"guard schema version {version} is newer than this Esper understands ({GUARD_SCHEMA_VERSION})"
            )
        constraints = mapping(self.range_constraints, COLUMN, "range_constraints")
        for k, v in constraints.items():
            text(v, COLUMN, f"range_constraints[{quote(k)}]", limit=1024)
        object.__setattr__(self, "range_constraints", dict(constraints))
        ranges: dict[str, tuple[int, int]] = {}
        for i in inputs:
            for d in i.dims:
                if d.dynamic:
                    assert d.name is not None and d.min is not None and d.max is not None
                    if ranges.setdefault(d.name, (d.min, d.max)) != (d.min, d.max):
                        raise EntryFormatError(
                            COLUMN, f"dim {d.name!r} has two ranges: {list(ranges[d.name])} and {[d.min, d.max]}"
                        )

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
        return tuple(tuple(sizes[d.name] if d.dynamic else d.size for d in i.dims) for i in self.inputs)  # type: ignore[misc, index]

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
    def from_dict(cls, data: Any) -> GuardSchema:
        """Parse stored data: :class:`SchemaVersionError` for a newer version, else :class:`EntryFormatError`
        (column ``guards``) for anything that is not exactly a valid schema."""
        d = mapping(data, COLUMN, "the guard schema", keys=("version", "device", "range_constraints", "inputs"))
        version = d.get("version", 0)
        if type(version) is int and version > GUARD_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"guard schema version {version} is newer than this Esper understands ({GUARD_SCHEMA_VERSION})"
            )
        if "inputs" not in d or "device" not in d:
            raise EntryFormatError(COLUMN, "the guard schema needs 'inputs' and 'device'")
        inputs = []
        for k, raw in enumerate(sequence(d["inputs"], COLUMN, "inputs")):
            i = mapping(raw, COLUMN, f"inputs[{k}]", keys=("name", "dtype", "dims"))
            if set(i) != {"name", "dtype", "dims"}:
                raise EntryFormatError(COLUMN, f"inputs[{k}] needs 'name', 'dtype' and 'dims'")
            dims = sequence(i["dims"], COLUMN, f"inputs[{k}].dims", limit=MAX_RANK)
            inputs.append(InputGuard(i["name"], i["dtype"], tuple(DimGuard.from_dict(x) for x in dims)))
        return cls(
            inputs=tuple(inputs),
            device=d["device"],
            range_constraints=d.get("range_constraints", {}),
            version=version,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> GuardSchema:
        """Parse stored JSON (see :meth:`from_dict`); text that is not JSON is an :class:`EntryFormatError`."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise EntryFormatError(COLUMN, f"not JSON: {quote(str(e))}") from None
        return cls.from_dict(data)


def bind_arguments(schema: GuardSchema, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """The inputs in ``schema``'s positional order, with keyword arguments placed by input name.

    Raises :class:`TypeError` (as Python would for the eager module) for too many positional arguments, an
    unknown name, a name given twice, or a missing input; the caller serves such a call eagerly.
    """
    if not kwargs:
        return tuple(args)
    names = [i.name for i in schema.inputs]
    if len(args) > len(names):
        raise TypeError(f"takes {len(names)} inputs ({', '.join(names)}), got {len(args)} positional")
    bound: list[Any] = list(args) + [_MISSING] * (len(names) - len(args))
    for key, value in kwargs.items():
        try:
            k = names.index(key)
        except ValueError:
            raise TypeError(f"got an unexpected keyword argument {quote(key)} (inputs: {', '.join(names)})") from None
        if bound[k] is not _MISSING:
            raise TypeError(f"got multiple values for input {key!r}")
        bound[k] = value
    missing = [n for n, v in zip(names, bound, strict=True) if v is _MISSING]
    if missing:
        raise TypeError(f"missing inputs: {', '.join(missing)}")
    return tuple(bound)


_MISSING = object()


def explain(schema: GuardSchema, *, device_index: int | None = None) -> Callable[[Sequence[Any]], str | None]:
    """The readable check: ``None`` when ``schema`` accepts the inputs, else the first reason it does not.

    ``device_index``: on a CUDA schema, the exact device the artifact was loaded on (a tensor on another GPU
    is refused); ``None`` checks the device type only. Ignored for CPU.
    """
    specs = tuple(
        (i.name, TORCH_DTYPES[i.dtype], i.rank, tuple((k, d.size, d.name, d.min, d.max) for k, d in enumerate(i.dims)))
        for i in schema.inputs
    )
    n_inputs = len(specs)
    device_type = schema.device
    index = device_index if device_type == "cuda" else None

    def check(args: Sequence[Any]) -> str | None:
        if len(args) != n_inputs:
            return f"expected {n_inputs} inputs, got {len(args)}"
        bound: dict[str, int] = {}
        for x, (name, dtype, rank, dims) in zip(args, specs, strict=True):
            if isinstance(x, torch.Tensor) and x.dtype != dtype:
                return f"input {name!r} has dtype {x.dtype}, guard requires {dtype}"
            problem = serving_problem(x, device_type, index)
            if problem is not None:
                return f"input {name!r} {problem}"
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


@dataclass(frozen=True)
class Regions:
    """Where in a schema's shape space its compiled code serves: cells along ``dims`` (dynamic dim names of
    the schema), cut at ``cuts[d]`` (ascending integers: a size at or above the ``i``-th cut lies past the
    ``i``-th cell of dim ``d``), and ``compiled``, one flag per cell, row-major over the dims (the last varies
    fastest). Validated on construction, as a guard schema is: only integers and identifiers."""

    dims: tuple[str, ...]
    cuts: tuple[tuple[int, ...], ...]
    compiled: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.dims or len(self.dims) != len(self.cuts) or len(set(self.dims)) != len(self.dims):
            raise EntryFormatError(COLUMN, "regions need one list of cuts per distinct dim")
        for d in self.dims:
            identifier(d, COLUMN, "a region's dim")
        for cuts in self.cuts:
            if any(type(c) is not int or not 0 <= c <= MAX_SIZE for c in cuts) or list(cuts) != sorted(cuts):
                raise EntryFormatError(COLUMN, f"region cuts {quote(cuts)} are not ascending validated integers")
        cells = 1
        for cuts in self.cuts:
            cells *= len(cuts) + 1
        if len(self.compiled) != cells or not all(type(c) is bool for c in self.compiled):
            raise EntryFormatError(COLUMN, f"regions need {cells} cell flags, not {len(self.compiled)}")


# Ranges up to this size index a tuple by the size itself; wider ones bisect the cut points.
DIRECT_SIZES = 1 << 14


def _region_tables(region: Regions, index: int, count: int, ranges: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The tables :func:`_region_expression` reads for schema ``index`` of ``count``: ``g{index}`` the code of
    each cell (``index`` where compiled, ``count + index`` elsewhere), and per dim ``j`` either ``o{index}_{j}``,
    the cell offset of every size up to the range's max, or ``c{index}_{j}``, its cuts (a wide range)."""
    codes = tuple(index if c else count + index for c in region.compiled)
    tables: dict[str, Any] = {}
    stride = 1
    for j in reversed(range(len(region.dims))):
        cuts, high = region.cuts[j], ranges[region.dims[j]][1]
        if high <= DIRECT_SIZES:
            offsets = tuple(bisect.bisect_right(cuts, v) * stride for v in range(high + 1))
            # One dim: the size indexes the codes themselves.
            tables[f"o{index}_{j}"] = tuple(codes[o] for o in offsets) if len(region.dims) == 1 else offsets
        else:
            tables[f"c{index}_{j}"] = cuts
        stride *= len(cuts) + 1
    tables[f"g{index}"] = codes
    return tables


def _region_expression(
    region: Regions, index: int, sizes: Mapping[str, str], ranges: Mapping[str, tuple[int, int]]
) -> str:
    """Source of schema ``index``'s answer under ``region``: its cell's code, from the sizes the guards read
    (``sizes``: dim name -> the generated expression that holds it)."""
    if any(d not in sizes for d in region.dims):
        raise EntryFormatError(COLUMN, "dispatch generator refused a region over a dim the guards do not read")
    i = _int_literal(index)
    terms: list[str] = []
    stride = 1
    for j in reversed(range(len(region.dims))):
        dim, cuts = region.dims[j], region.cuts[j]
        if ranges[dim][1] <= DIRECT_SIZES:
            terms.append(f"o{i}_{_int_literal(j)}[{sizes[dim]}]")
        else:
            scaled = f" * {_int_literal(stride)}" if stride != 1 else ""
            terms.append(f"bisect(c{i}_{_int_literal(j)}, {sizes[dim]}){scaled}")
        stride *= len(cuts) + 1
    if len(region.dims) == 1 and ranges[region.dims[0]][1] <= DIRECT_SIZES:
        return terms[0]
    return f"g{i}[{' + '.join(reversed(terms))}]"


def _int_literal(value: Any) -> str:
    """``value``'s source text, only for a validated int: the generator's last line of defence."""
    if type(value) is not int or not 0 <= value <= MAX_SIZE:
        raise EntryFormatError(COLUMN, f"predicate generator refused {quote(value)}: not a validated integer")
    return str(value)


def same_but_ranges(a: GuardSchema, b: GuardSchema) -> bool:
    """Whether ``a`` and ``b`` differ at most in their dynamic dims' ranges (the shape profiles of one
    blueprint version do): then one generated dispatcher can check both."""
    if a.device != b.device or len(a.inputs) != len(b.inputs):
        return False
    for x, y in zip(a.inputs, b.inputs, strict=True):
        if (x.name, x.dtype, x.rank) != (y.name, y.dtype, y.rank):
            return False
        if any((d.size, d.name) != (e.size, e.name) for d, e in zip(x.dims, y.dims, strict=True)):
            return False
    return True


def _guard_source(
    schemas: Sequence[GuardSchema],
    device_index: int | None,
    *,
    name: str,
    hit: Callable[[str], str],
    miss: str,
    regions: Sequence[Regions | None] = (),
    fast: bool = False,
    laid_out: Sequence[bool] = (),
    runners: Sequence[bool] = (),
) -> str:
    """Python source of a straight-line function ``name(args)`` for ``schemas`` (which must be
    :func:`same_but_ranges`): every check the schemas share once, then each schema's ranges in order; the
    first that holds returns ``hit(index)`` (``index`` as source text), any refusal ``miss``. No loops, every
    constant inlined. Where ``regions[index]`` is given, that schema's hit is instead the code its
    :class:`Regions` places the sizes in, read from tables bound in the namespace (:func:`_region_tables`):
    ``index`` in a compiled cell; outside them the later schemas are tried, and ``len(schemas) + index`` of the
    first schema that placed the call in an eager cell is returned where none takes it compiled.

    ``fast``: first a shorter way in. ``match`` (:func:`esper.artifacts.servable.tensor_match`, bound in the
    namespace) tests every input's type, dtype, device, rank and fixed sizes and the thread's dispatch state in
    one C call; a call it passes, inside a schema's ranges, in a compiled cell, with no torch function mode, no
    forward-AD level open and every input contiguous returns its code plus ``2 * len(schemas)``: the caller may
    then skip its own thread-state, grad and layout checks. An input whose ``laid_out`` is true had its strides
    checked by ``match`` (contiguous, every stride fixed), and is not tested for contiguity again. Where
    ``runners[index]`` is true, such a call returns ``r<index>`` (bound in the namespace) instead of a code. A
    call every accepting schema places in an eager cell returns its code as soon as the sizes have been placed.
    Anything else takes the full path
    below, as without ``fast``.

    Only integers (checked again here, whatever the schema's construction did) and fixed names are written
    into the source: dtypes are bound as ``d0``, ``d1``... in the namespace, never spelled from stored text,
    and a region's tables as ``g0``, ``o0_1``, ``c0_1``... (names made of integers).
    """
    schema = schemas[0]
    if schema.device not in DEVICE_TYPES or len(schema.inputs) > MAX_COUNT:
        raise EntryFormatError(COLUMN, f"predicate generator refused device {quote(schema.device)}")
    if not all(same_but_ranges(schema, other) for other in schemas[1:]):
        raise EntryFormatError(COLUMN, "predicate generator refused schemas that differ beyond their ranges")
    device_test = {"cpu": "not {x}.is_cpu", "cuda": "not {x}.is_cuda"}[schema.device]
    if device_index is not None and schema.device == "cuda":
        device_test += " or {x}.get_device() != " + _int_literal(device_index)
    lines = [f"def {name}(args):", f"    if len(args) != {_int_literal(len(schema.inputs))}:", f"        return {miss}"]
    # What only compiled code needs (dtype, device, layout, the negative bit, functorch wrappers, forward-AD
    # tangents) is tested after the sizes: a call that a region places in an eager cell runs eager whatever
    # those are, and skips their cost. A nested tensor is refused before its shape is read (reading it may
    # raise).
    properties: list[str] = []
    first_seen: dict[str, str] = {}
    for n, inp in enumerate(schema.inputs):
        if inp.dtype not in TORCH_DTYPES:
            raise EntryFormatError(COLUMN, f"predicate generator refused dtype {quote(inp.dtype)}")
        x = f"x{n}"
        lines += [
            *([] if fast else [f"    {x} = args[{n}]"]),  # the fast way in has read them
            f"    t = type({x})",
            f"    if (t is not Tensor and t is not Parameter) or {x}.is_nested:",
            f"        return {miss}",
            f"    s{n} = {x}.shape",
            f"    if len(s{n}) != {_int_literal(inp.rank)}:",
            f"        return {miss}",
        ]
        properties += [
            f"if {x}.dtype is not d{n} or {device_test.format(x=x)} or {x}.layout is not strided or {x}.is_neg():",
            f"    return {miss}",
            f"if {WRAPPED_TEST.format(x=x)}:",
            f"    return {miss}",
        ]
        for k, d in enumerate(inp.dims):
            v = f"s{n}[{k}]"
            if not d.dynamic:
                lines += [f"    if {v} != {_int_literal(d.size)}:", f"        return {miss}"]
            elif d.name in first_seen:
                lines += [f"    if {v} != {first_seen[d.name]}:", f"        return {miss}"]
            else:
                first_seen[str(d.name)] = v
    regions = [
        None if r is None else Regions(r.dims, r.cuts, r.compiled)  # validated again, whatever their construction did
        for r in [*regions, *[None] * (len(schemas) - len(regions))]
    ]
    inside = any(r is not None for r in regions)
    if not inside:
        lines += [f"    {line}" for line in properties]
        for index, each in enumerate(schemas):
            lines += [f"    if {_held(each, first_seen)}:", f"        return {hit(_int_literal(index))}"]
        lines.append(f"    return {miss}")
    else:
        # ``found``: the eager code of the first schema that accepted the call into an eager cell; a later
        # schema may still serve it compiled (routes of one profile that share its cells between them).
        lines.append("    found = None")
        for index, each in enumerate(schemas):
            region = regions[index]
            lines.append(f"    if {_held(each, first_seen)}:")
            inner = " " * 8
            if region is not None:
                lines += [
                    f"        code = {_region_expression(region, index, first_seen, each.dim_ranges())}",
                    f"        if code < {_int_literal(len(schemas))}:",
                ]
                inner = " " * 12
            lines += [f"{inner}{line}" for line in properties]
            lines.append(f"{inner}return {'code' if region is not None else hit(_int_literal(index))}")
            if region is not None:
                lines += ["        if found is None:", "            found = code"]
        lines.append(f"    return {miss} if found is None else found")
    if fast:
        lines[3:3] = _fast_source(schemas, regions, hit, laid_out, runners)
    return "\n".join(lines)


def _fast_source(
    schemas: Sequence[GuardSchema],
    regions: Sequence[Regions | None],
    hit: Callable[[str], str],
    laid_out: Sequence[bool],
    runners: Sequence[bool],
) -> list[str]:
    """The lines of :func:`_guard_source`'s shorter way in (see its ``fast``), placed after the argument count
    test: ``match`` has tested the types, ranks and fixed sizes (and the strides of inputs ``laid_out``), so only
    the dynamic sizes are read, once each, into ``v0``, ``v1``... Every way out of it that is not an answer falls
    through to the full tests."""
    schema = schemas[0]
    xs = [f"x{n}" for n in range(len(schema.inputs))]
    lines = [f"    {x} = args[{n}]" for n, x in enumerate(xs)]
    lines.append(f"    if match({', '.join(xs)}):")
    sizes: dict[str, str] = {}
    same: list[str] = []
    for n, inp in enumerate(schema.inputs):
        dynamic = [(k, d) for k, d in enumerate(inp.dims) if d.dynamic]
        if dynamic:
            lines.append(f"        s{n} = x{n}.shape")
        for k, d in dynamic:
            read = f"s{n}[{_int_literal(k)}]"
            if d.name in sizes:
                same.append(f"{read} == {sizes[d.name]}")
            else:
                sizes[str(d.name)] = f"v{_int_literal(len(sizes))}"
                lines.append(f"        {sizes[str(d.name)]} = {read}")
    indent = " " * 8
    if same:  # a dim two inputs share: equal, or the full tests refuse the call
        lines.append(f"{indent}if {' and '.join(same)}:")
        indent += " " * 4
    laid = [*laid_out, *[False] * (len(xs) - len(laid_out))]
    plain = " and ".join(
        [
            "not function_modes()",
            "forward_ad._current_level < 0",
            *(f"{x}.is_contiguous()" for x, checked in zip(xs, laid, strict=True) if not checked),
        ]
    )
    verified = _int_literal(2 * len(schemas))
    count = _int_literal(len(schemas))
    served = [*runners, *[False] * (len(schemas) - len(runners))]
    if not any(r is not None for r in regions):
        for index, each in enumerate(schemas):
            way_out = f"r{_int_literal(index)}" if served[index] else f"{hit(_int_literal(index))} + {verified}"
            lines += [
                f"{indent}{'if' if index == 0 else 'elif'} {_held(each, sizes)}:",
                f"{indent}    if {plain}:",
                f"{indent}        return {way_out}",
            ]
        return lines
    # The first schema that accepts the call into a compiled cell answers it; ``found`` is ``None`` until a
    # schema accepts, then the eager code of the first eager cell, or ``-1`` once a compiled cell's call needs
    # the full tests (nothing later may answer before that schema does).
    lines.append(f"{indent}found = None")
    for index, each in enumerate(schemas):
        region = regions[index]
        way_out = f"r{_int_literal(index)}" if served[index] else f"{hit(_int_literal(index))} + {verified}"
        held = _held(each, sizes)
        lines.append(f"{indent}if {held}:" if index == 0 else f"{indent}if found != -1 and {held}:")
        inner = indent + " " * 4
        if region is not None:
            lines += [
                f"{inner}code = {_region_expression(region, index, sizes, each.dim_ranges())}",
                f"{inner}if code < {count}:",
            ]
            inner += " " * 4
        lines += [f"{inner}if {plain}:", f"{inner}    return {way_out}", f"{inner}found = -1"]
        if region is not None:
            lines += [f"{indent}    elif found is None:", f"{indent}        found = code"]
    lines += [f"{indent}if found is not None and found >= 0:", f"{indent}    return found"]
    return lines


def _held(schema: GuardSchema, sizes: Mapping[str, str]) -> str:
    """Source of the test that every dynamic size (``sizes``: dim name -> its expression) is in ``schema``'s
    range."""
    ranges = schema.dim_ranges()
    held = [f"{_int_literal(ranges[d][0])} <= {v} <= {_int_literal(ranges[d][1])}" for d, v in sizes.items()]
    return " and ".join(held) or "True"


def _predicate_source(schema: GuardSchema, device_index: int | None = None) -> str:
    return _guard_source([schema], device_index, name="accepts", hit=lambda _: "True", miss="False")


def _compile_guard(
    schemas: Sequence[GuardSchema],
    device_index: int | None,
    *,
    name: str,
    hit: Callable[[str], str],
    miss: str,
    regions: Sequence[Regions | None] = (),
    match: Callable[..., bool] | None = None,
    laid_out: Sequence[bool] = (),
    runners: Sequence[object | None] = (),
) -> Callable[[Sequence[Any]], Any]:
    # Validates every literal first.
    source = _guard_source(
        schemas,
        device_index,
        name=name,
        hit=hit,
        miss=miss,
        regions=regions,
        fast=match is not None,
        laid_out=laid_out,
        runners=[r is not None for r in runners],
    )
    namespace: dict[str, Any] = {
        "Tensor": torch.Tensor,
        "Parameter": torch.nn.Parameter,
        "strided": torch.strided,
        "bisect": bisect.bisect_right,
        "match": match,
        **predicate_namespace(),
        **{f"d{n}": TORCH_DTYPES[i.dtype] for n, i in enumerate(schemas[0].inputs)},
        **{f"r{n}": r for n, r in enumerate(runners) if r is not None},
    }
    for index, region in enumerate(regions):
        if region is not None:
            namespace.update(_region_tables(region, index, len(schemas), schemas[index].dim_ranges()))
    exec(compile(source, f"<guard {name}>", "exec"), namespace)
    return namespace[name]


def compile_predicate(schema: GuardSchema, *, device_index: int | None = None) -> Callable[[Sequence[Any]], bool]:
    """A predicate generated for ``schema``: straight-line code with every constant inlined (about a
    microsecond for one input). Kasmina runs it on every call. ``device_index``: see :func:`explain`."""
    return _compile_guard([schema], device_index, name="accepts", hit=lambda _: "True", miss="False")


def compile_dispatch(
    schemas: Sequence[GuardSchema],
    *,
    device_index: int | None = None,
    regions: Sequence[Regions | None] = (),
    fast: bool = False,
    runners: Sequence[object | None] = (),
) -> Callable[[Sequence[Any]], Any] | None:
    """A dispatcher generated for the schemas of a kernel's routes: it returns the index of the first schema
    that accepts the inputs, ``-1`` when none does, at the cost of one predicate whatever the number of
    routes (the checks they share run once). ``None`` when the schemas differ beyond their ranges, or there
    are none: check each route's predicate in turn then.

    ``regions``, one per schema (``None``, or missing at the end: none), splits a schema's range into cells: a
    call a schema accepts outside the compiled cells of its :class:`Regions` goes on to the next schemas (schemas
    of routes sharing one profile's cells are the same), and returns ``len(schemas) + index`` of the first such
    schema where none takes it into a compiled cell. The sizes the guards read are looked up where they were
    read: the region costs a tuple index per dim, not a second pass over the arguments. A call placed outside
    the compiled cells is answered as soon as its sizes are placed: the dtype, device, layout and wrapper tests
    guard compiled code only, and an eager call pays for none of them.

    ``fast``: a call accepted into a compiled cell whose inputs and calling thread one C call finds plain
    (:func:`esper.artifacts.servable.tensor_match`: no input requires grad, no autocast, no mode, no functorch
    transform; then no forward-AD level) and whose inputs are contiguous returns ``2 * len(schemas) + index``:
    compiled code may serve it with no further check of the thread or the layout. Without that C call in this
    torch, no call is answered so. An input whose strides are all fixed (every dim after its first is) has them
    checked in that C call, its contiguity with no test of its own.

    ``runners`` (with ``fast``), one per schema (``None``, or missing at the end: none): where such a call would
    return ``2 * len(schemas) + index`` and ``runners[index]`` is given, it returns ``runners[index]`` instead (the
    caller's compiled code for that schema: its hot path then looks nothing up)."""
    if not schemas or not all(same_but_ranges(schemas[0], s) for s in schemas[1:]):
        return None
    if len(regions) > len(schemas) or len(runners) > len(schemas):
        raise ValueError("more regions or runners than schemas")
    match, laid_out = None, tuple(contiguous_strides(i) for i in schemas[0].inputs)
    if fast:
        schema = schemas[0]
        if schema.device in DEVICE_TYPES and all(i.dtype in TORCH_DTYPES for i in schema.inputs):
            match = _tensor_match(
                tuple(
                    (TORCH_DTYPES[i.dtype], tuple(None if d.dynamic else d.size for d in i.dims)) for i in schema.inputs
                ),
                schema.device,
                device_index if schema.device == "cuda" else None,
                laid_out,
            )
    return _compile_guard(
        schemas,
        device_index,
        name="route_of",
        hit=str,
        miss="-1",
        regions=regions,
        match=match,
        laid_out=[s is not None for s in laid_out],
        runners=runners if match is not None else (),
    )


@functools.lru_cache(maxsize=256)
def _tensor_match(
    inputs: tuple[tuple[torch.dtype, tuple[int | None, ...]], ...],
    device: str,
    device_index: int | None,
    strides: tuple[tuple[int, ...] | None, ...],
) -> Callable[..., bool] | None:
    # One check per input signature, whichever kernel asks: it is a pure test of its arguments and of the calling
    # thread, and building one starts a thread (a kernel builds two dispatchers; a deferred route, once loaded,
    # builds them again).
    return tensor_match(inputs, device, device_index, strides=strides)


def contiguous_strides(guard: InputGuard) -> tuple[int, ...] | None:
    """The strides of a contiguous tensor that ``guard`` accepts, where they are the same at every size it
    accepts (every dim after the first is fixed); ``None`` where some stride depends on a dynamic size."""
    if any(d.dynamic for d in guard.dims[1:]):
        return None
    strides: list[int] = []
    step = 1
    for d in reversed(guard.dims[1:]):
        strides.append(step)
        step *= max(int(d.size), 1)  # type: ignore[arg-type]  # as torch lays out a dim of size 0
    return (step, *reversed(strides)) if guard.dims else ()


def compile_check(schema: GuardSchema, *, device_index: int | None = None) -> Callable[[Sequence[Any]], str | None]:
    """Build the per-call check for ``schema``: it returns ``None`` when the inputs are accepted, else why not.

    Kasmina runs this on every call, so the accepting path is a predicate generated for this schema (about a
    microsecond); only a refusal pays for :func:`explain` to say why.
    """
    accepts = compile_predicate(schema, device_index=device_index)
    why = explain(schema, device_index=device_index)

    def check(args: Sequence[Any]) -> str | None:
        if accepts(args):
            return None
        return why(args) or "refused by the guard predicate"

    return check
