"""Which tensors compiled code can serve: plain, strided, dense tensors, nothing wrapped or lazily transformed.

AOTInductor code reads a tensor's data pointer, sizes and strides and nothing else. A tensor whose meaning
lives elsewhere gives wrong results or an error inside compiled code, where eager would be right:

- a forward-mode dual tensor (``torch.autograd.forward_ad``): its tangent is silently dropped;
- a functorch-wrapped tensor (inside ``torch.func.vmap``/``grad``/``jvp``): the wrapper is not the data;
- a tensor subclass (``type(x)`` other than ``torch.Tensor`` or ``nn.Parameter``): its ``__torch_dispatch__``
  or ``__torch_function__`` would be bypassed;
- a conjugate or negative-bit view (``x.is_conj()``, ``x.is_neg()``): the bit is a lazy operation;
- a non-strided layout (sparse, mkldnn, jagged) or a nested tensor; a quantized tensor (its dtype is never
  one of :data:`esper.artifacts.validate.DTYPES`, so the dtype check already refuses it).

torch offers no public predicate for two of these, so the private calls live here and nowhere else, pinned
by ``tests/artifacts/test_servable.py``:

- ``torch._C._functorch.is_functorch_wrapped_tensor``: true for BatchedTensor (vmap) and GradTrackingTensor
  (grad, jvp); what ``torch._dynamo`` itself uses to recognize them.
- ``torch.autograd.forward_ad._current_level``: ``-1`` outside every ``dual_level()`` context. A tangent
  exists only inside one (leaving it drops every tangent of that level), so the accepting path reads this one
  integer and pays for ``unpack_dual`` only while a dual level is open.

The fast path (:func:`tensor_match`) uses a third: ``torch._C._dynamo.guards.TensorGuards``, the C++ tensor
check ``torch.compile``'s own guards are made of. One call tests every input's exact type, dtype, device,
``requires_grad`` and dispatch keys as the calling thread would dispatch them; the keys hold what the tests
above read one by one (nested, sparse and mkldnn layouts, the negative and conjugate bits, functorch wrappers)
and the thread's autocast, dispatch-mode and functorch state. It only ever lets a call skip the tests above:
whatever it refuses takes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C import _functorch

PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


#: Source text of the generated predicate's wrapper test for tensor ``{x}`` (after its type, dtype, device, layout,
#: nested and negative-bit tests), and the names it uses, for :func:`esper.artifacts.guards.compile_predicate`. The C
#: function is bound directly: a Python wrapper would double its cost on the accepting path.
WRAPPED_TEST = "wrapped({x}) or (forward_ad._current_level >= 0 and has_tangent({x}))"


def predicate_namespace() -> dict[str, Any]:
    """The names :data:`WRAPPED_TEST` refers to, and ``function_modes`` (the depth of the calling thread's
    torch function mode stack: one C call) for the generated fast path."""
    return {
        "wrapped": _functorch.is_functorch_wrapped_tensor,
        "forward_ad": _forward_ad,
        "has_tangent": has_tangent,
        "function_modes": torch._C._len_torch_function_stack,
    }


def tensor_match(
    inputs: Sequence[tuple[torch.dtype, Sequence[int | None]]],
    device: str,
    device_index: int | None = None,
    *,
    strides: Sequence[Sequence[int] | None] = (),
) -> Callable[..., bool] | None:
    """One C call, ``match(x0, x1, ...)``, true only for inputs that are plain ``torch.Tensor`` (exactly; not
    ``nn.Parameter``), of the given dtypes, ranks and fixed sizes, on ``device`` (``device_index``: that CUDA
    device), none requiring grad, that the calling thread would dispatch as plain dense tensors: no autocast for
    their device, no dispatch mode, no functorch transform. ``inputs``: each input's dtype and sizes, one per
    dim, ``None`` for a dim of any size. ``strides``, one per input (``None``, or missing at the end: not
    checked): that input's strides, every one checked exactly. It does not look at torch function modes or
    forward-mode tangents. ``None`` where torch offers no such check.

    A call it refuses may still be servable (an inference-mode tensor, a Parameter): it is a fast way in, never
    the only one. The expected dispatch keys are taken from example tensors made on a fresh thread, whose
    dispatch state is the default whatever the loading thread has enabled: built inside ``torch.autocast`` on
    the loading thread, it would otherwise accept autocast calls."""
    layouts = [*strides, *[None] * (len(inputs) - len(strides))]
    if len(layouts) != len(inputs) or any(
        s is not None and len(s) != len(sizes) for s, (_, sizes) in zip(layouts, inputs, strict=True)
    ):
        raise ValueError("tensor_match: strides must give one stride per dim, for at most one list per input")
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    built: list[Callable[..., bool]] = []

    def build() -> None:
        try:
            where = torch.device(device, device_index) if device_index is not None else torch.device(device)
            # The examples give the rank, dtype, device and dispatch keys, and fit the sizes and strides checked
            # (zero strides where none are: one element of memory whatever the sizes); the lists say which sizes
            # and strides are checked, one list per tensor, ``None`` for each left unchecked (``Any``: torch's
            # stub types them as a single list).
            examples = [
                torch.empty_strided(
                    [1 if n is None else n for n in sizes],
                    [0] * len(sizes) if layout is None else list(layout),
                    dtype=dtype,
                    device=where,
                )
                for (dtype, sizes), layout in zip(inputs, layouts, strict=True)
            ]
            checked: Any = [list(sizes) for _, sizes in inputs]
            steps: Any = [
                [None] * len(sizes) if s is None else list(s) for (_, sizes), s in zip(inputs, layouts, strict=True)
            ]
            guards = TensorGuards(*examples, dynamic_dims_sizes=checked, dynamic_dims_strides=steps)
            if guards.check(*examples):
                built.append(guards.check)
        except Exception:  # a torch whose TensorGuards differs: the Python tests alone
            return

    worker = threading.Thread(target=build, name="esper-tensor-match", daemon=True)
    try:
        worker.start()
        worker.join()
    except RuntimeError:  # no thread to spare: the Python tests alone
        return None
    return built[0] if built else None


def functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a functorch wrapper (vmap's BatchedTensor, grad/jvp's GradTrackingTensor)."""
    return bool(_functorch.is_functorch_wrapped_tensor(x))


def dual_level() -> int:
    """The innermost open forward-AD level, ``-1`` when none is open (no tensor can carry a tangent)."""
    return _forward_ad._current_level


def has_tangent(x: torch.Tensor) -> bool:
    """Whether ``x`` carries a forward-mode tangent at the current level (call only when a level is open)."""
    return _forward_ad.unpack_dual(x).tangent is not None


def serving_problem(x: Any, device_type: str, device_index: int | None = None) -> str | None:
    """Why compiled code for ``device_type`` (and ``device_index``, when given) cannot serve ``x``; ``None``
    when it can. The readable twin of the generated predicate's tensor checks: slower, says why."""
    if not isinstance(x, torch.Tensor):
        return f"is a {type(x).__name__}, not a Tensor"
    if type(x) not in PLAIN_TYPES:
        return f"is a tensor subclass ({type(x).__name__}); compiled code serves only torch.Tensor"
    if x.device.type != device_type:
        return f"is on {x.device}, guard requires {device_type}"
    if device_index is not None and x.get_device() != device_index:
        return f"is on {x.device}, guard requires {device_type}:{device_index}"
    if x.layout is not torch.strided:
        return f"has layout {x.layout}, compiled code serves only torch.strided"
    if x.is_nested:
        return "is a nested tensor"
    if x.is_conj():
        return "is a conjugate view (is_conj()); resolve it with .resolve_conj()"
    if x.is_neg():
        return "is a negative-bit view (is_neg()); resolve it with .resolve_neg()"
    if functorch_wrapped(x):
        return "is wrapped by a torch.func transform (vmap, grad or jvp)"
    if dual_level() >= 0 and has_tangent(x):
        return "is a forward-mode dual tensor (torch.autograd.forward_ad); compiled code would drop its tangent"
    return None
