"""The blueprint contract: what a catalog file declares.

A blueprint file is plain Python that creates one or more :class:`Blueprint` values at module level::

    from esper.blueprint import Blueprint, Dim, Input, seeded

    BATCH = Dim("batch", 1, 64)

    def build():
        with seeded(0):
            return MyModule(256).eval()

    RESIDUAL_MLP = Blueprint(
        name="residual_mlp",
        version=1,
        build=build,
        inputs=(Input("x", "float32", (BATCH, 256)),),
        representative=({"batch": 1}, {"batch": 8}, {"batch": 64}),
    )

Constructing a :class:`Blueprint` checks everything that can be checked without building the module and
raises :class:`BlueprintError` naming the field. :mod:`esper.catalog` adds the file name and the checks
that need the module (weights deterministic, dims matching the module).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from esper.artifacts.validate import DTYPES as VALID_DTYPES
from esper.artifacts.variants import DEFAULT_VARIANTS, VARIANTS
from esper.profiles import bucket_problem, contains, layouts, profiles, with_hot_sizes

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
DTYPES = VALID_DTYPES  # the one fixed list (esper.artifacts.validate.DTYPES)


class BlueprintError(ValueError):
    """A blueprint declaration is malformed. The message names the file (when known) and the field."""

    def __init__(self, field_name: str, problem: str, *, source: str | None = None, name: str | None = None):
        self.field = field_name
        self.problem = problem
        self.source = source
        # Only a valid name is kept: callers build file names from it (an invalid one is quoted in ``problem``).
        self.blueprint = name if isinstance(name, str) and NAME_RE.match(name) else None
        name = self.blueprint
        where = ", ".join(p for p in (source, f"blueprint {name!r}" if name else None) if p)
        super().__init__(f"{where + ': ' if where else ''}field {field_name!r}: {problem}")

    def located(self, source: str) -> BlueprintError:
        """The same error, naming the file it came from."""
        return BlueprintError(self.field, self.problem, source=source, name=self.blueprint)


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: a name shared by every input dim that must be equal, and an inclusive range.

    ``hot``: sizes inside the range that callers send often. Where the compiler cannot keep this dim dynamic,
    Tezzeret compiles an exact-size specialization for each of them beside the representative sizes (see
    :mod:`esper.profiles`); where it can, they are measured like representative sizes."""

    name: str
    min: int
    max: int
    hot: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.name):
            raise BlueprintError("inputs", f"dim name {self.name!r} is not an identifier")
        if not isinstance(self.min, int) or not isinstance(self.max, int):
            raise BlueprintError("inputs", f"dim {self.name!r}: min and max must be integers")
        if self.min < 1:
            raise BlueprintError("inputs", f"dim {self.name!r}: min={self.min} must be >= 1")
        if self.min > self.max:
            raise BlueprintError("inputs", f"dim {self.name!r}: min={self.min} > max={self.max}")
        try:
            hot = tuple(self.hot)
        except TypeError:
            raise BlueprintError("inputs", f"dim {self.name!r}: hot={self.hot!r} is not a sequence of sizes") from None
        for n in hot:
            if isinstance(n, bool) or not isinstance(n, int) or not self.min <= n <= self.max:
                raise BlueprintError("inputs", f"dim {self.name!r}: hot size {n!r} is not an integer in {self!r}")
        if len(set(hot)) != len(hot):
            raise BlueprintError("inputs", f"dim {self.name!r}: hot sizes repeat: {list(hot)}")
        object.__setattr__(self, "hot", tuple(sorted(hot)))

    def __repr__(self) -> str:
        return f"{self.name}[{self.min}..{self.max}]"


DimSpec = int | Dim


@dataclass(frozen=True)
class Input:
    """One named tensor input: dtype and shape; ``low``/``high`` bound the values tests may draw."""

    name: str
    dtype: str
    shape: tuple[DimSpec, ...]
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise BlueprintError("inputs", f"input name {self.name!r} is not an identifier")
        if self.dtype not in DTYPES:
            raise BlueprintError("inputs", f"input {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for i, d in enumerate(self.shape):
            if isinstance(d, bool) or not isinstance(d, int | Dim):
                raise BlueprintError("inputs", f"input {self.name!r}: shape[{i}]={d!r} is neither int nor Dim")
            if isinstance(d, int) and d < 1:
                raise BlueprintError("inputs", f"input {self.name!r}: shape[{i}]={d} must be >= 1")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise BlueprintError("inputs", f"input {self.name!r}: low={self.low} > high={self.high}")

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """This input's shape with each dynamic dim replaced by ``sizes[dim.name]``."""
        return tuple(sizes[d.name] if isinstance(d, Dim) else d for d in self.shape)


@dataclass(frozen=True)
class Tolerance:
    """Compiled-vs-eager parity tolerance, as for ``torch.testing.assert_close``."""

    atol: float = 1e-4
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise BlueprintError("tolerance", f"atol={self.atol} and rtol={self.rtol} must be >= 0")


@dataclass(frozen=True)
class Budget:
    """Latency budget: p95 milliseconds per representative shape (by label) and a compiled/eager ratio cap.

    Labels are those of :meth:`Blueprint.shape_label`, e.g. ``"batch=8"``. ``None`` ratio means the
    budget profile's default applies.
    """

    p95_ms: Mapping[str, float] = field(default_factory=dict)
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "p95_ms", dict(self.p95_ms))
        for label, ms in self.p95_ms.items():
            if not (isinstance(ms, int | float) and ms > 0):
                raise BlueprintError("budget", f"p95_ms[{label!r}]={ms!r} must be a positive number")
        if self.max_ratio is not None and not self.max_ratio > 0:
            raise BlueprintError("budget", f"max_ratio={self.max_ratio} must be > 0")


@dataclass(frozen=True)
class Blueprint:
    """A declared blueprint: a deterministic module builder plus its input contract.

    ``representative`` lists dim assignments (``{"batch": 8}``) used for warm-up and benchmarks.
    ``source`` is filled in by the catalog loader with the declaring file.
    """

    name: str
    version: int
    build: Callable[[], Any]
    inputs: tuple[Input, ...]
    representative: tuple[Mapping[str, int], ...]
    tolerance: Tolerance = field(default_factory=Tolerance)
    budget: Budget = field(default_factory=Budget)
    buckets: Mapping[str, Sequence[tuple[int, int]]] = field(default_factory=dict)
    variants: Sequence[str] = DEFAULT_VARIANTS
    description: str = ""
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        name = self.name if isinstance(self.name, str) else None

        def fail(field_name: str, problem: str) -> BlueprintError:
            return BlueprintError(field_name, problem, source=self.source, name=name)

        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise fail("name", f"{self.name!r} must match {NAME_RE.pattern}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise fail("version", f"{self.version!r} must be an integer >= 1")
        if not callable(self.build):
            raise fail("build", f"{self.build!r} is not callable (a function returning an nn.Module)")
        try:
            inputs = tuple(self.inputs)
        except TypeError:
            raise fail("inputs", "must be a sequence of Input") from None
        if not inputs or not all(isinstance(i, Input) for i in inputs):
            raise fail("inputs", "must be a non-empty sequence of Input")
        object.__setattr__(self, "inputs", inputs)
        names = [i.name for i in inputs]
        if len(set(names)) != len(names):
            raise fail("inputs", f"input names repeat: {names}")
        dims: dict[str, Dim] = {}
        for i in inputs:
            for d in i.shape:
                if isinstance(d, Dim) and dims.setdefault(d.name, d) != d:
                    raise fail("inputs", f"dim {d.name!r} declared with two ranges: {dims[d.name]!r}, {d!r}")
        if not isinstance(self.tolerance, Tolerance):
            raise fail("tolerance", "must be a Tolerance")
        if not isinstance(self.budget, Budget):
            raise fail("budget", "must be a Budget")
        reps = tuple(dict(r) for r in self.representative)
        if not reps:
            raise fail("representative", "needs at least one shape (a dict of dim sizes; {} if none)")
        for k, rep in enumerate(reps):
            if set(rep) != set(dims):
                raise fail("representative", f"[{k}] assigns {sorted(rep)}, the dynamic dims are {sorted(dims)}")
            for dname, size in rep.items():
                d = dims[dname]
                if not isinstance(size, int) or not d.min <= size <= d.max:
                    raise fail("representative", f"[{k}] {dname}={size!r} is outside {d!r}")
        object.__setattr__(self, "representative", reps)
        labels = {self.shape_label(r) for r in reps}
        unknown = set(self.budget.p95_ms) - labels
        if unknown:
            raise fail("budget", f"p95_ms names {sorted(unknown)}, representative labels are {sorted(labels)}")
        object.__setattr__(self, "buckets", {k: tuple(tuple(b) for b in v) for k, v in dict(self.buckets).items()})
        for dname, buckets in self.buckets.items():
            if dname not in dims:
                raise fail("buckets", f"{dname!r} is not a dynamic dim (those are {sorted(dims)})")
            problem = bucket_problem(dname, dims[dname].min, dims[dname].max, buckets)
            if problem:
                raise fail("buckets", problem)
        object.__setattr__(self, "variants", tuple(self.variants))
        unknown_variants = [v for v in self.variants if v not in VARIANTS]
        if unknown_variants or not self.variants:
            raise fail("variants", f"{unknown_variants or 'none'}: choose from {list(VARIANTS)}")
        for pname, ranges in self.profiles().items():
            if not any(contains(ranges, r) for r in reps):
                raise fail("buckets", f"profile {pname} holds no representative shape to benchmark it with")

    @property
    def dims(self) -> dict[str, Dim]:
        """The dynamic dims by name, in declaration order."""
        out: dict[str, Dim] = {}
        for i in self.inputs:
            for d in i.shape:
                if isinstance(d, Dim):
                    out.setdefault(d.name, d)
        return out

    def profiles(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Shape profiles (name -> dim ranges): one, ``"default"``, unless the blueprint declares buckets."""
        return profiles({n: (d.min, d.max) for n, d in self.dims.items()}, self.buckets)

    def layouts(self) -> list[frozenset[str]]:
        """Per input, the dynamic dims that share its strides: those after its leading dim
        (:func:`esper.profiles.layouts`)."""
        return layouts([[d.name if isinstance(d, Dim) else None for d in i.shape] for i in self.inputs])

    def hot_sizes(self) -> dict[str, tuple[int, ...]]:
        """The declared hot sizes by dim (only the dims that declare some)."""
        return {n: d.hot for n, d in self.dims.items() if d.hot}

    def specialization_sizes(self) -> dict[str, tuple[int, ...]]:
        """Per dynamic dim, the sizes an exact-size specialization is compiled for should the dim not stay
        dynamic: its sizes in the representative shapes and its hot sizes, ascending."""
        return {n: tuple(sorted({r[n] for r in self.representative} | set(d.hot))) for n, d in self.dims.items()}

    def measured_shapes(self) -> list[dict[str, int]]:
        """The shapes latency is measured at: the representative shapes, then one per hot size of a dim not among
        them for each representative shape (with that dim at the hot size)."""
        return with_hot_sizes(self.representative, self.hot_sizes())

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input for one assignment of the dynamic dims."""
        return {i.name: i.concrete(sizes) for i in self.inputs}

    @staticmethod
    def shape_label(sizes: Mapping[str, int]) -> str:
        """A stable label for a dim assignment: ``"batch=8,seq=32"`` (``"static"`` when there are none)."""
        return ",".join(f"{k}={v}" for k, v in sizes.items()) or "static"

    @staticmethod
    def label_sizes(label: str) -> dict[str, int]:
        """The dim assignment a :meth:`shape_label` names (``{}`` for ``"static"``)."""
        return {k: int(v) for k, v in (part.split("=") for part in label.split(",") if "=" in part)}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a builder with its random draws seeded by ``seed``: they come from a private generator of this
    thread (:class:`esper.seeding.PrivateDraws`), the same numbers ``torch.manual_seed(seed)`` would give,
    whatever other threads draw meanwhile. torch's global generator is neither read nor changed."""
    from esper.seeding import PrivateDraws

    with PrivateDraws(seed):
        yield
