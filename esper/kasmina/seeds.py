"""Seeds: one blueprint's compiled code, many sets of weights.

Every seed grown from a blueprint has its own weights. A seed is bound to a kernel by a state dict or by
the seed's own module; its names, shapes and dtypes are checked against the artifact's weight schema first,
and a mismatch is a :class:`WeightSchemaError` naming the tensor.

Inference packages hold their weights as constants. All seeds bound from one kernel share one extra loaded
copy of the package (the base kernel's own copy keeps the builder's weights) and take turns in it: before a
call, the seed's tensors are handed to the loader, aliased rather than copied (``user_managed``), whenever
the package holds another seed's, or this seed's weights changed in place since (tensor version counters
tell). Swapping costs ~0.1 ms; each seed holds only its own weights.

Inductor may fold a weight into the compiled code at compile time (it then leaves the package's constant
list). Such a weight cannot take a seed's value: a seed whose folded weight differs from the blueprint's
runs eager, with the WARNING that names the tensor.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from esper.kasmina import telemetry
from esper.kasmina.runtime import CompiledPackage
from esper.kasmina.tensors import TensorSpec, WeightSchemaError, schema_of

if TYPE_CHECKING:
    from esper.kasmina.kernel import Kernel
    from esper.urza import Entry

Weights = torch.nn.Module | Mapping[str, torch.Tensor]


def state_of(weights: Weights) -> dict[str, torch.Tensor]:
    """A state dict from a module or a mapping (a ``WeightSchemaError`` for anything else)."""
    if isinstance(weights, torch.nn.Module):
        return dict(weights.state_dict())
    if isinstance(weights, Mapping):
        bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightSchemaError(f"seed weight {bad[0]!r} is a {type(weights[bad[0]]).__name__}, not a Tensor")
        return dict(weights)
    raise WeightSchemaError(f"seed weights must be an nn.Module or a state dict, not {type(weights).__name__}")


def check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec], *, against: str) -> None:
    """Raise :class:`WeightSchemaError` naming the first tensor that is missing, unknown, or of another
    shape or dtype than ``expected`` (the schema of ``against``, e.g. ``"artifact #3 of 'tiny_mlp'"``)."""
    for name, spec in expected.items():
        if name not in state:
            raise WeightSchemaError(f"seed weights lack {name!r} ({spec.describe()}), which {against} needs")
        got = TensorSpec.of(name, state[name])
        if got != spec:
            raise WeightSchemaError(f"seed weight {name!r} is {got.describe()}; {against} expects {spec.describe()}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise WeightSchemaError(
            f"seed weight {unknown[0]!r} is not a weight of {against} (it has: {', '.join(sorted(expected))})"
        )


def seed_module(
    weights: Weights, build: Callable[[], torch.nn.Module], expected: Mapping[str, TensorSpec], *, against: str
) -> torch.nn.Module:
    """The module that holds a seed's weights: ``weights`` itself when it is a module, else a fresh build of
    the blueprint with a copy of ``weights`` loaded (so the seed owns them). Checked against ``expected``."""
    check_weights(state_of(weights), expected, against=against)
    if isinstance(weights, torch.nn.Module):
        return weights
    module = build()
    with torch.no_grad():
        module.load_state_dict(dict(weights), strict=True)
    return module


# -- inference kernels bound to a seed's weights ---------------------------------------------------------

_serial = itertools.count(1)
# One extra loaded copy of a package per base package, shared by every seed bound from it.
_seed_packages: weakref.WeakKeyDictionary[CompiledPackage, CompiledPackage] = weakref.WeakKeyDictionary()


def _shared_package(base: CompiledPackage) -> CompiledPackage:
    pkg = _seed_packages.get(base)
    if pkg is None:
        pkg = base.reload()
        _seed_packages[base] = pkg
    return pkg


class BoundPackage:
    """A shared package called with one seed's tensors as its constants (see the module docstring)."""

    def __init__(self, package: CompiledPackage, tensors: Mapping[str, torch.Tensor]):
        self._package = package
        self._serial = next(_serial)
        self._names = tuple(tensors)
        self._tensors = tuple(tensors.values())

    def _key(self) -> Hashable:
        return (self._serial, *((t.data_ptr(), t._version) for t in self._tensors))

    def _constants(self) -> dict[str, torch.Tensor]:
        return {n: t.detach() for n, t in zip(self._names, self._tensors, strict=True)}

    def __call__(self, args: list[torch.Tensor]) -> Any:
        return self._package.run_with_constants(self._key(), self._constants, args)

    def metadata(self) -> dict[str, str]:
        return self._package.metadata()

    def constant_names(self) -> list[str]:
        return list(self._names)


def _live_tensors(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The module's own parameter and buffer objects by state-dict name (their version counters move)."""
    live = dict(module.named_parameters(remove_duplicate=False))
    live.update(module.named_buffers(remove_duplicate=False))
    return {n: live[n] for n in names}


def _unbindable(entry: Entry, state: Mapping[str, torch.Tensor], builder: Mapping[str, torch.Tensor]) -> str | None:
    """Why a compiled entry cannot run with this seed's weights (``None``: it can).

    Weights that are not package constants were folded into the code (or are unused). Tezzeret records the
    folded ones (``meta["folded_constants"]``); for an entry from before it did, every floating-point weight
    that is not a constant counts as possibly folded. A folded weight is fine only at the blueprint's value.
    """
    meta = entry.meta
    if not meta.get("swappable", True):
        return (
            f"entry #{entry.id} (variant {entry.variant!r}) folds the weights into its compiled code "
            "(Kasmina.load_seeds routes seeds to swappable code)"
        )
    constants = meta.get("constants")
    if not constants:
        return f"entry #{entry.id} records no constant schema"
    if "folded_constants" in meta:
        suspects = [n for n in meta["folded_constants"] if n in state]
    else:
        suspects = [n for n, t in state.items() if n not in constants and t.is_floating_point()]
    for name in suspects:
        if not torch.equal(state[name].detach().cpu(), builder[name].detach().cpu()):
            return f"weight {name!r} was folded into the compiled code of entry #{entry.id}, and this seed's differs"
    return None


def bind(kernel: Kernel, weights: Weights) -> Kernel:
    """An inference kernel running ``kernel``'s compiled code with a seed's own weights.

    ``weights`` is the seed's module (used as is, also as the eager fallback) or a state dict (copied into a
    fresh build of the blueprint). Names, shapes and dtypes must match the blueprint's state dict and each
    compiled entry's constant schema, else :class:`WeightSchemaError` names the tensor. A route whose code
    cannot take the seed's weights runs eager for this seed, with a WARNING saying why. Binding a bound
    kernel binds the kernel it was bound from (its ``origin``).
    """
    base = kernel.origin
    builder = base.eager_module().state_dict()
    against = f"blueprint {base.blueprint!r}"
    expected = schema_of(builder)
    for r in base.routes:
        for name, spec in (r.entry.meta.get("constants") or {}).items():
            if expected.get(name) != TensorSpec.from_dict(name, spec):
                raise WeightSchemaError(
                    f"blueprint {base.blueprint!r} no longer matches entry #{r.entry.id}'s weight {name!r}"
                )

    def build() -> torch.nn.Module:
        return base.build_eager().eval()

    module = seed_module(weights, build, expected, against=against)
    state = module.state_dict()
    routes = []
    for r in base.routes:
        if r.package is None:
            routes.append(r)
            continue
        problem = _unbindable(r.entry, state, builder)
        if problem is None:
            names = sorted(r.entry.meta["constants"])
            tensors = _live_tensors(module, names)
            wrong = next((n for n, t in tensors.items() if t.device.type != r.entry.compat.device_type), None)
            if wrong is not None:
                raise WeightSchemaError(
                    f"seed weight {wrong!r} is on {tensors[wrong].device}, entry #{r.entry.id} "
                    f"runs on {r.entry.compat.device_type}"
                )
            if not isinstance(r.package, CompiledPackage):
                raise TypeError(
                    f"entry #{r.entry.id}'s route calls a {type(r.package).__name__}, not a loaded package: "
                    "only a kernel Kasmina loaded can be bound to seeds"
                )
            routes.append(r.with_package(BoundPackage(_shared_package(r.package), tensors)))
        else:
            # Once per origin kernel and reason, not once per seed: a hundred seeds are one problem.
            base.warn_once(telemetry.UNBINDABLE, f"{problem}; profile {r.entry.profile} runs eager for such seeds")
            routes.append(r.with_package(None))
    return base.derive(routes=routes, eager_factory=lambda: module, reason=f"{base.reason}; seed weights")
