"""When compiled code computes what eager would: the calling thread's dispatch state, and the seed module's form.

Certified code is the blueprint's forward, traced once, in eval mode, at the default dispatch state. It stays
right only while a call would run that same computation eagerly:

- :func:`mode_problem`: nothing in the calling thread changes what eager computes (autocast, a
  ``TorchFunctionMode`` such as ``torch.device(...)`` used as a context, a ``TorchDispatchMode``, a process-wide
  forward hook that would see and may change every submodule's output). Each check is one C call.
- :class:`SeedForm`: a seed module runs the blueprint's forward: the same class at every submodule (a subclass
  may override ``forward``), no forward or backward hooks on any of them, and every attribute its forward may
  read besides its weights (LoRA's ``scaling``, ``eps``) equal to the blueprint's, and every submodule in the
  mode the code was traced in. The rule is
  structural, not a proof of equivalence: a seed that differs in form is refused for the compiled path even
  where its computation would happen to agree, because proving that would mean running both.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.modules.module as _nn_module

__all__ = ["HOOK_TABLES", "MODE_QUERIES", "MODULE_TABLES", "SeedForm", "mode_problem"]

# nn.Module's process-wide forward hook tables (private to torch; mutated in place, never rebound).
_GLOBAL_FORWARD_HOOKS = (_nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks)


# The thread-state queries mode_problem makes, for a hot path that inlines them (each one C call, true when
# something is active): autocast on any device, the TorchFunctionMode stack, the TorchDispatchMode stack.
MODE_QUERIES = (
    torch._C._is_any_autocast_enabled,
    torch._C._len_torch_function_stack,
    torch._C._len_torch_dispatch_stack,
)


def mode_problem() -> str | None:
    """Why the calling thread's state would make eager compute something the compiled code does not
    (``None``: nothing does). Cheap enough for every call: a few C calls, no allocation."""
    # torch offers these queries only under private names; each is one C call with no side effect.
    if torch._C._is_any_autocast_enabled():
        return "autocast is enabled (eager computes in the autocast dtype; the compiled code does not)"
    if torch._C._len_torch_function_stack():
        return "a TorchFunctionMode is active (eager runs through it; the compiled code would not)"
    if torch._C._len_torch_dispatch_stack():
        return "a TorchDispatchMode is active (eager runs through it; the compiled code would not)"
    if _GLOBAL_FORWARD_HOOKS[0] or _GLOBAL_FORWARD_HOOKS[1]:
        return "a process-wide forward hook is registered (it sees every submodule's call; compiled code has none)"
    return None


# The entries nn.Module keeps in every instance's __dict__ (its parameter, buffer, module and hook tables):
# everything else in a submodule's __dict__ is an attribute its forward may read.
# nn.Module's own tables and hook dicts in every instance's __dict__ (``training`` is a mode, not a table:
# watchers treat it like an attribute), and the hook tables that change what a forward computes.
MODULE_TABLES = frozenset(vars(torch.nn.Module())) - {"training"}
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@dataclass(frozen=True)
class WeightRefs:
    """An attribute that refers only to the module's own weights, by their names: ``nn.RNNBase`` keeps its
    parameters in ``_flat_weights`` and weak references to them in ``_flat_weight_refs``. Their values are the
    seed's weights, which are checked as weights; only which weights they name is form."""

    names: tuple[str | None, ...]


def _weight_refs(value: Any, own: dict[int, str]) -> Any:
    """``value`` as :class:`WeightRefs` when it is a list or tuple of the module's own parameters or buffers,
    weak references to them, or ``None`` (at least one weight); else ``value`` itself."""
    if not isinstance(value, list | tuple) or not value:
        return value
    names: list[str | None] = []
    for item in value:
        target = item() if isinstance(item, weakref.ref) else item
        if target is None:
            names.append(None)
        elif isinstance(target, torch.Tensor) and id(target) in own:
            names.append(own[id(target)])
        else:
            return value
    return WeightRefs(tuple(names)) if any(n is not None for n in names) else value


def _attributes(module: torch.nn.Module) -> dict[str, Any]:
    own = {
        id(t): n
        for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        if t is not None
    }
    return {
        k: _weight_refs(v, own) if own else v
        for k, v in vars(module).items()
        if k not in MODULE_TABLES and k != "training"
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
        )
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a value whose == raises or is ambiguous is not provably the same
        return False


def _code(cls: type) -> list[tuple[str, str, Any]]:
    """Every function a class and its bases up to ``nn.Module`` define, as (class, name, bytecode and constants)."""
    out = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch."):
            break
        for name, value in vars(klass).items():
            code = getattr(value, "__code__", None)
            out.append((klass.__qualname__, name, None if code is None else (code.co_code, code.co_consts)))
    return out


def _same_class(a: type, b: type) -> bool:
    """``a`` is ``b``, or the same class from another import of the same blueprint file (a catalog loaded twice
    imports each file again): same module and qualified name, and the same code in every method."""
    if a is b:
        return True
    if (a.__module__, a.__qualname__) != (b.__module__, b.__qualname__) or a.__module__.startswith("torch."):
        return False
    try:
        return bool(_code(a) == _code(b))
    except Exception:  # a class attribute whose == raises is not provably the same
        return False


@dataclass(frozen=True)
class SeedForm:
    """The form of the module certification compiled: each submodule's name, class and attributes."""

    modules: tuple[tuple[str, type, dict[str, Any]], ...]

    @classmethod
    def of(cls, reference: torch.nn.Module) -> SeedForm:
        """The form of ``reference``, a fresh build of the blueprint in eval mode."""
        return cls(tuple((n, type(m), _attributes(m)) for n, m in reference.named_modules(remove_duplicate=False)))

    def problem(self, module: torch.nn.Module, *, training: bool = False) -> str | None:
        """Why ``module`` may not run the blueprint's compiled forward (``None``: its form is the blueprint's).
        ``training``: the mode the compiled code was traced in (every submodule must be in it)."""
        mine: Sequence[tuple[str, torch.nn.Module]] = list(module.named_modules(remove_duplicate=False))
        names = [n for n, _, _ in self.modules]
        if [n for n, _ in mine] != names:
            return f"its submodules are {[n for n, _ in mine]}, the blueprint's {names}"
        for (name, cls, attributes), (_, m) in zip(self.modules, mine, strict=True):
            where = f"submodule {name!r}" if name else "the seed module"
            if not _same_class(type(m), cls):
                return f"{where} is a {type(m).__qualname__}, the blueprint's is a {cls.__qualname__}"
            hooks = [h for h in HOOK_TABLES if getattr(m, h)]
            if hooks:
                return f"{where} has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)}"
            if m.training != training:
                return f"{where} is in {'training' if m.training else 'eval'} mode; the compiled code is not"
            now = _attributes(m)
            for key in sorted(set(now) | set(attributes)):
                if key not in now or key not in attributes or not _same(now[key], attributes[key]):
                    return f"{where}'s attribute {key!r} differs from the blueprint's"
        return None
