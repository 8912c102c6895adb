"""What every Kasmina kernel keeps, whatever artifact kind it runs: its route and the reason for it, which
path the last call took, per-path call counts, and one WARNING per refusal pattern.

Subclasses (:class:`~esper.kasmina.kernel.Kernel` for inference,
:class:`~esper.kasmina.training_kernel.TrainingKernel` for training) add only how a call is dispatched.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from esper.artifacts.guards import GuardSchema, bind_arguments
from esper.kasmina import telemetry
from esper.urza import Entry

# A seed's weights: its module, or a state dict.
Weights = torch.nn.Module | Mapping[str, torch.Tensor]

COMPILED = "compiled"
EAGER = "eager"


def refusal_pattern(detail: str) -> str:
    """The pattern of a refusal: its detail with every number replaced by ``N`` (``"dim 0 is 65"`` and
    ``"dim 0 is 70"`` are one pattern), so a loop over out-of-range sizes is one WARNING, not one per size."""
    return re.sub(r"\d+", "N", detail)


class KernelBase(torch.nn.Module):
    """The bookkeeping shared by every kernel.

    ``route`` is ``"compiled"`` when compiled code is loaded, else ``"eager"``; ``reason`` says why (or why
    not). After each call ``last_path`` says which path that call took, and ``compiled_calls`` and
    ``eager_calls`` count the calls each path took (``calls``: both as a Counter). They are unsynchronized
    diagnostics: with several threads calling one kernel they describe some recent call.
    """

    def __init__(self, blueprint: str, *, reason: str):
        super().__init__()
        self.blueprint = blueprint
        self.reason = reason
        self.last_path: str | None = None
        # Plain ints in the instance dict, not a Counter: every call counts, and a Counter's increment costs a
        # few times an int's on the hot path.
        self.__dict__.update(compiled_calls=0, eager_calls=0)
        self._warned: set[str] = set()
        # How to load this kernel again through Kasmina's load path (set by the loader; ``None`` for a kernel
        # built elsewhere): a pickled kernel is this and its seed's state, never native code.
        self.source: Callable[[], KernelBase] | None = None

    @property
    def route(self) -> str:
        """``"compiled"`` or ``"eager"``."""
        raise NotImplementedError

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Never native state: a pickled kernel is how to load it again through Kasmina's load path
        # (verification included) and its seed's module, bound again once loaded.
        if self.source is None:
            raise TypeError(
                f"a kernel of {self.blueprint!r} that Kasmina did not load cannot be pickled: it holds loaded "
                "native code and no source to load it again from"
            )
        return _reload, (self.source, _picklable(self._modules.get("seed")))

    def __copy__(self) -> KernelBase:
        # What copy.copy did before __reduce_ex__ was overridden: a new object sharing this one's attributes.
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    @property
    def entry(self) -> Entry | None:
        """The Urza entry whose compiled code runs (``None`` when nothing compiled is loaded)."""
        raise NotImplementedError

    @property
    def calls(self) -> Counter[str]:
        """Calls per path so far (a new Counter; a path no call took is absent)."""
        d = self.__dict__
        return Counter({p: n for p, n in ((COMPILED, d["compiled_calls"]), (EAGER, d["eager_calls"])) if n})

    def took(self, path: str) -> None:
        """Record that a call took ``path`` (``"compiled"`` or ``"eager"``)."""
        d = self.__dict__
        d["last_path"] = path
        d["compiled_calls" if path == COMPILED else "eager_calls"] += 1

    def positional(
        self, schema: GuardSchema | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """``args`` with ``kwargs`` placed by input name (compiled code takes positions only); ``None`` when
        there is no schema or they do not fit its inputs: the eager module then takes the call as given, and
        answers it as Python would."""
        if schema is None:
            return None
        try:
            return bind_arguments(schema, args, kwargs)
        except TypeError as e:
            self.warn_once(telemetry.OUTSIDE_GUARDS, f"arguments do not fit the inputs ({e}); this call runs eager")
            return None

    def warn_once(self, code: str, detail: str) -> None:
        """Emit the fallback WARNING (reason ``code``) unless one of the same pattern was emitted by this kernel:
        the pattern is the detail with its numbers normalized (:func:`refusal_pattern`)."""
        pattern = refusal_pattern(detail)
        if pattern not in self._warned:
            self._warned.add(pattern)
            telemetry.fallback(self.blueprint, code, detail)


def _picklable(seed: torch.nn.Module | None) -> Weights | None:
    """The seed itself when pickle can find its class again by name, else its state dict (a blueprint file's
    class is imported under a private module name that another process does not have)."""
    if seed is None:
        return None
    cls = type(seed)
    owner = sys.modules.get(cls.__module__)
    if owner is not None and getattr(owner, cls.__qualname__, None) is cls:
        return seed
    return {k: v.detach() for k, v in seed.state_dict().items()}


def _reload(source: Callable[[], KernelBase], seed: Weights | None) -> KernelBase:
    """What unpickling a kernel runs: load it again from ``source``, and bind ``seed`` when it had one."""
    kernel = source()
    return kernel if seed is None else kernel.bind(seed)  # type: ignore[operator]  # each subclass defines bind
