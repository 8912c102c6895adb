"""Random draws from a private generator: what :func:`esper.blueprint.seeded` runs a builder under.

Seeding torch's global generator (``torch.manual_seed``) makes a build depend on every other thread of the
process: a thread that draws a random number while a module is being built takes some of the build's numbers,
and the module's weights change. :class:`PrivateDraws` is a dispatch mode instead: modes are per thread, so it
sees only the building thread's operators, and it hands every random operator called without a generator a
private :class:`torch.Generator` seeded with the seed. A fresh generator seeded with ``s`` draws exactly what
the global one draws after ``torch.manual_seed(s)``, so builds keep their weights bit for bit; the global
generator is neither read nor changed.

Operators that draw and have no form taking a generator (dropout's fused kernels, recurrent layers' training
kernels, fused attention with dropout) cannot be routed: those few draw from the global generator as before.
A builder only initialises weights, which goes through the operators that do take one.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# torch offers dispatch modes only under this private module name (there is no public alias); the class is the
# documented extension point of __torch_dispatch__ and stable across releases.
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PrivateDraws"]

GENERATOR = "generator"


def _argument_names(op: torch._ops.OpOverload) -> tuple[str, ...]:
    return tuple(a.name for a in op._schema.arguments)


@functools.cache
def with_generator(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The overload of ``op`` that takes a ``generator`` (``op`` itself when it does): ``aten.randn.default``
    has none, ``aten.randn.generator`` is the same operator with one. ``None`` when no overload does."""
    names = _argument_names(op)
    if GENERATOR in names:
        return op
    packet = op.overloadpacket
    for name in packet.overloads():
        other = getattr(packet, name)
        others = _argument_names(other)
        if GENERATOR in others and tuple(n for n in others if n != GENERATOR) == names:
            return other
    return None


def _device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    """Where an operator draws: its first tensor argument's device, else its ``device`` argument, else the CPU."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    device = kwargs.get("device")
    return torch.device(device) if device is not None else torch.device("cpu")


class PrivateDraws(TorchDispatchMode):
    """While active (in the thread that entered it), every random operator called without a generator draws
    from a private generator per device, seeded with ``seed``."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g


def _dispatch(
    self: PrivateDraws,
    func: torch._ops.OpOverload,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    kwargs = kwargs or {}
    if torch.Tag.nondeterministic_seeded in func.tags and kwargs.get(GENERATOR) is None:
        target = with_generator(func)
        device = _device(args, kwargs)
        if target is not None and device.type != "meta":  # nothing is drawn on meta tensors
            return target(*args, **{**kwargs, GENERATOR: self.generator(device)})
    return func(*args, **kwargs)


# Set after the class is made: TorchDispatchMode wraps a subclass's own __torch_dispatch__ in a "disable
# Dynamo" shim whose first call imports torch._dynamo, which a Kasmina process must never import (it builds
# eager modules under this mode). Nothing here is traced, so the shim has nothing to do.
PrivateDraws.__torch_dispatch__ = _dispatch  # type: ignore[method-assign, assignment]
