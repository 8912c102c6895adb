"""The one place that touches torch's private package loader.

torch's public loader for AOT-compiled ``.pt2`` packages imports the whole compiler stack (about a second,
and a training node must not carry it). The C++ loader underneath, ``torch._C._aoti.AOTIModelPackageLoader``,
loads the package in milliseconds without it. Its positional signature is
``(path, model_name, run_single_threaded, num_runners, device_index)``; tests/artifacts/test_runtime.py pins the
behaviour this wrapper relies on.

Given a ``.pt2`` file, the loader extracts it into a temporary folder that only its destructor removes: a
process killed, ended by ``os._exit``, or finalized with packages still reachable leaves the folder behind.
Given an extracted folder, it loads from there and leaves the folder alone; so packages are extracted here,
into folders Esper owns and removes (:mod:`esper.artifacts.extraction`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import weakref
import zipfile
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from esper.artifacts import extraction
from esper.artifacts.tensors import DTYPES


class PackageLoadError(RuntimeError):
    """The package could not be loaded by the C++ loader."""


class CompiledPackage:
    """A loaded ``.pt2`` package: call it with positional tensors, get the module's output structure back.

    Calls from several threads are safe: the AOTInductor container hands each call a model instance of its
    pool and makes later callers wait for one (its ``run`` is built for concurrent serving). What the
    container does not serialize is replacing constants: :meth:`load_constants` and :meth:`run_with_constants`
    hold this package's lock, and so does :meth:`__call__`. :attr:`boxed_runner` does not (a Python lock around every
    call costs a hot path measurably more than the lock's own operations), so a package whose runner was
    handed out refuses to have its constants replaced: :meth:`reload` a copy for that.
    """

    def __init__(self, path: str | Path, *, member: str | None = None, device_index: int = -1, num_runners: int = 1):
        """Load the package file ``path``, or the package stored as ``member`` of the zip ``path``."""
        folder: Path | None = None
        try:
            folder = extraction.package_folder()
            if member is None:
                extraction.extract(path, folder)
            else:
                with zipfile.ZipFile(path) as outer:
                    extraction.extract(io.BytesIO(outer.read(member)), folder)
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(folder), "model", False, num_runners, device_index)
        except Exception as e:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise PackageLoadError(f"{type(e).__name__}: {e}") from e
        weakref.finalize(self, extraction.discard, folder, os.getpid())
        self.member = member
        _, out_spec = self._loader.get_call_spec()
        self._out_spec = pytree.treespec_loads(out_spec)
        # Most blueprints return one tensor: skip rebuilding the output structure on every call.
        self._single = self._out_spec.num_leaves == 1 and self._out_spec.num_nodes == 1
        self._lock = threading.Lock()
        self._runner = _runner(self._loader.run, self._single, self._out_spec)  # type: ignore[arg-type]
        self._runner_out = False
        self.path = Path(path)
        self.device_index = device_index
        # Which caller's constants are loaded (run_with_constants), and those tensors, kept alive while aliased.
        self._active: tuple[Hashable, dict[str, torch.Tensor]] | None = None
        self._constant_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] | bool | None = False

    def __copy__(self) -> CompiledPackage:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledPackage:
        # A loaded package is read-only compiled code whose own lock serializes calls: copies of a kernel share it.
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a loaded package ({self.path}) cannot be pickled: pickle what loads it again (its kernel's source)"
        )

    def metadata(self) -> dict[str, str]:
        return dict(self._loader.get_metadata())

    def constant_names(self) -> list[str]:
        """Fully qualified names of the package's constants (its weights and buffers)."""
        return list(self._loader.get_constant_fqns())

    def constant_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
        """Shape and dtype of each constant, by fully qualified name, as the compiled code reads it (``None``
        when they cannot be read). The loader checks neither when constants are loaded, and reports no shapes:
        they are read from the package's own wrapper source, which declares every constant's metadata."""
        if self._constant_specs is False:
            self._constant_specs = _read_constant_specs(self.path, self.constant_names())
        return self._constant_specs  # type: ignore[return-value]

    @property
    def boxed_runner(self) -> Callable[[Sequence[torch.Tensor]], Sequence[Any]]:
        """:meth:`__call__` without the lock (see the class), its output boxed: ``boxed_runner(args)[0]`` is
        ``package(args)``. For a hot path that calls a package whose constants stay those it was loaded with: a
        one-output package's is the loader's own ``run``, with no Python frame of ours around it."""
        self._runner_out = True
        return self._runner

    def _replacing_constants(self) -> None:
        if self._runner_out:
            raise RuntimeError(
                f"the constants of {self.path} cannot be replaced: its lock-free runner was handed out "
                "(calls through it could run while they change); reload() a copy of the package for that"
            )

    def load_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the package's constants (all of them) without recompiling."""
        self._replacing_constants()
        with self._lock:
            self._loader.load_constants(tensors, False, True)

    def __call__(self, args: Sequence[torch.Tensor]) -> Any:
        # ``boxed_runner`` is the same call without the lock, for hot paths. ``run`` takes any sequence (a tuple
        # or a list of tensors): no copy of the arguments per call.
        with self._lock:
            flat = self._loader.run(args)  # type: ignore[arg-type]
        return flat[0] if self._single else pytree.tree_unflatten(separate(flat), self._out_spec)

    def reload(self) -> CompiledPackage:
        """Another loaded copy of the same package file (its own constants, the same compiled code on disk)."""
        return CompiledPackage(self.path, member=self.member, device_index=self.device_index)

    def run_with_constants(
        self, key: Hashable, constants: Callable[[], dict[str, torch.Tensor]], args: Sequence[torch.Tensor]
    ) -> Any:
        """Run with the caller's constants: ``constants()`` is loaded, aliased rather than copied, only when
        ``key`` differs from the last call's (callers change the key when their tensors change)."""
        self._replacing_constants()
        with self._lock:
            if self._active is None or self._active[0] != key:
                tensors = constants()
                self._active = None  # a failed load leaves nobody's constants trusted
                self._loader.load_constants(tensors, False, True, True)
                self._active = (key, tensors)
            flat = self._loader.run(args)  # type: ignore[arg-type]
        return flat[0] if self._single else pytree.tree_unflatten(separate(flat), self._out_spec)


def _runner(
    run: Callable[[Sequence[torch.Tensor]], list[Any]], single: bool, spec: pytree.TreeSpec
) -> Callable[[Sequence[torch.Tensor]], Sequence[Any]]:
    """:attr:`CompiledPackage.boxed_runner`: the loader's ``run`` itself for a one-output package (most
    blueprints; its list's first item is the output), else a closure that boxes the output structure."""
    if single:
        return run

    def structured(args: Sequence[torch.Tensor]) -> tuple[Any]:
        return (pytree.tree_unflatten(separate(run(args)), spec),)

    return structured


def separate(outputs: list[Any]) -> list[Any]:
    """``outputs`` with each tensor whose memory overlaps an earlier one's replaced by its copy (in place).

    Compiled code may return one output as a view of another where eager returns separate tensors (a GRU's
    last hidden state is the output sequence's last step): a caller's write into one would then change the
    other. A copy is always within eager's contract: where eager's outputs do overlap, a fresh tensor holds the
    same values, and a caller cannot tell it from a view it did not write into. Outputs in disjoint parts of
    one buffer (chunks) are left as they are; overlap is judged by each tensor's byte span, so interleaved
    views that never touch the same element are copied too, which is still within the contract."""
    seen: list[tuple[int, int, int]] = []
    for i, t in enumerate(outputs):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:  # an empty tensor holds no element to share
            continue
        ptr = t.untyped_storage().data_ptr()
        start = int(t.storage_offset()) * t.element_size()
        extent = 1 + sum(int(n - 1) * int(st) for n, st in zip(t.shape, t.stride(), strict=True))
        end = start + extent * t.element_size()
        if any(p == ptr and start < e and s < end for p, s, e in seen):
            outputs[i] = t.clone()
        else:
            seen.append((ptr, start, end))
    return outputs


# One constant's metadata in an AOTInductor wrapper: ``constants_info_[0].shape = {8, 8};`` and the like.
_CONSTANT_FIELD = re.compile(r"constants_info_\[(\d+)\]\.(dtype|shape|original_fqn) = ([^;\n]*);")
_DTYPE_NAME = re.compile(r"cached_torch_dtype_([a-z0-9_]+)")


def _read_constant_specs(path: Path, names: Sequence[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
    """Each of ``names``' shape and dtype from the package's wrapper source; ``None`` unless every one parses
    into validated values (ints, a dtype from a fixed table)."""
    try:
        with zipfile.ZipFile(path) as z:
            wrappers = [n for n in z.namelist() if n.endswith(".wrapper.cpp")]
            if len(wrappers) != 1:
                return None
            source = z.read(wrappers[0]).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile):
        return None
    fields: dict[int, dict[str, str]] = {}
    for index, field, value in _CONSTANT_FIELD.findall(source):
        fields.setdefault(int(index), {})[field] = value.strip()
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for f in fields.values():
        fqn, shape, dtype = f.get("original_fqn", ""), f.get("shape", ""), _DTYPE_NAME.fullmatch(f.get("dtype", ""))
        if not (fqn.startswith('"') and fqn.endswith('"') and shape.startswith("{") and shape.endswith("}")):
            return None
        dims = [d.strip() for d in shape[1:-1].split(",") if d.strip()]
        if dtype is None or dtype.group(1) not in DTYPES or not all(d.isdigit() for d in dims):
            return None
        specs[fqn[1:-1]] = (tuple(int(d) for d in dims), DTYPES[dtype.group(1)])
    return specs if set(names) <= set(specs) else None


def device_index(device: torch.device) -> int:
    """The loader's device index for ``device``: ``-1`` for the CPU, else the CUDA index (``0`` when unset)."""
    return -1 if device.type == "cpu" else (device.index or 0)
