"""Finding and validating blueprint declarations in blueprint folders.

Every ``*.py`` file of a folder (not starting with ``_``) is imported by path and its module-level
:class:`~esper.blueprint.Blueprint` values are collected. A file that fails to import (any exception,
``SystemExit`` included; only ``KeyboardInterrupt`` goes through), or a name declared twice, is a
:class:`BlueprintError` naming the file; ``load_catalog(strict=False)`` keeps going and reports those errors
beside the blueprints that did load, so one bad file does not stop the others. File names derived from a
blueprint file come from :func:`module_file_name`, never from a declared (possibly invalid) name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from esper.blueprint import Blueprint, BlueprintError


class UnknownBlueprintError(KeyError):
    """A blueprint name that no folder declares."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Catalog:
    """The blueprints found, by name, and the files that could not be used."""

    blueprints: dict[str, Blueprint]
    errors: tuple[BlueprintError, ...] = ()

    def get(self, name: str) -> Blueprint:
        try:
            return self.blueprints[name]
        except KeyError:
            known = ", ".join(sorted(self.blueprints)) or "none"
            raise UnknownBlueprintError(f"unknown blueprint {name!r} (known: {known})") from None

    def select(self, names: Iterable[str]) -> list[Blueprint]:
        """The named blueprints (all if ``names`` is empty), in name order."""
        chosen = list(names)
        return [self.get(n) for n in chosen] if chosen else [self.blueprints[n] for n in sorted(self.blueprints)]


def module_file_name(source: str | Path | None) -> str:
    """A safe file-name stem for things generated from the blueprint file ``source``: its stem reduced to
    ``[a-z0-9_]`` (at most 40 characters) plus 8 hex digits of the path's sha256, e.g. ``"my_file_1a2b3c4d"``.

    Two files never share one (the digest), and nothing in it can leave a folder or be a dot file, whatever
    the file or its declarations are called. ``None`` (no file) gives ``"unknown_<digest>"``.
    """
    text = str(source) if source is not None else ""
    stem = re.sub(r"[^a-z0-9_]+", "_", Path(text).stem.lower()).strip("_")[:40] or "unknown"
    return f"{stem}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _module_name(path: Path) -> str:
    return f"esper_blueprints.{module_file_name(path)}"


def load_file(path: str | Path) -> list[Blueprint]:
    """Import one blueprint file and return its declarations, each with ``source`` set to the file."""
    path = Path(path).resolve()
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BlueprintError("file", "cannot be imported as Python", source=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BlueprintError as e:
        sys.modules.pop(name, None)
        raise e.located(str(path)) from e
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as e:  # SystemExit too: one bad file must never stop the catalog
        sys.modules.pop(name, None)
        raise BlueprintError("file", f"raised on import: {_describe(e)}", source=str(path)) from e
    found: dict[int, Blueprint] = {}
    for value in vars(module).values():
        if isinstance(value, Blueprint):
            found.setdefault(id(value), value)
    return [replace(bp, source=str(path)) for bp in found.values()]


def _describe(e: BaseException) -> str:
    """``"SystemExit: 3"``: an exception for a message, whose ``str`` may itself raise."""
    try:
        text = str(e)
    except Exception:
        text = "<unprintable>"
    return f"{type(e).__name__}: {text[:500]}"


def blueprint_files(folders: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        files += sorted(p for p in Path(folder).glob("*.py") if not p.name.startswith("_"))
    return files


def load_catalog(folders: Iterable[Path], *, strict: bool = True) -> Catalog:
    """Load every blueprint of ``folders``. ``strict`` raises the first error; else errors are collected."""
    blueprints: dict[str, Blueprint] = {}
    errors: list[BlueprintError] = []
    for path in blueprint_files(folders):
        try:
            declared = load_file(path)
            for bp in declared:
                if bp.name in blueprints:
                    first = blueprints[bp.name].source
                    raise BlueprintError(
                        "name", f"{bp.name!r} is already declared in {first}", source=str(path), name=bp.name
                    )
            if not declared:
                raise BlueprintError("file", "declares no Blueprint at module level", source=str(path))
        except BlueprintError as e:
            if strict:
                raise
            errors.append(e)
            continue
        blueprints.update((bp.name, bp) for bp in declared)
    return Catalog(blueprints, tuple(errors))


def _state_equal(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    import torch

    if a.keys() != b.keys():
        return f"state dict keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        if not torch.equal(a[k], b[k]):
            return k
    return None


def validate_module(bp: Blueprint) -> None:
    """Checks that need the module, run before any compilation.

    The builder must return an ``nn.Module`` with the same weights every time, and the module must run
    eagerly at every representative shape and at the corners of every dynamic dim's range (a declared dim
    that does not match the module fails here, not after a minute of compiling).
    """
    import torch

    from esper.numerics.inputs import example_inputs

    def fail(field_name: str, problem: str) -> BlueprintError:
        return BlueprintError(field_name, problem, source=bp.source, name=bp.name)

    try:
        first, second = bp.build(), bp.build()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit from a builder is the blueprint's failure, not the run's
        raise fail("build", f"raised {_describe(e)}") from e
    if not isinstance(first, torch.nn.Module):
        raise fail("build", f"returned {type(first).__name__}, not a torch.nn.Module")
    differs = _state_equal(first.state_dict(), second.state_dict())
    if differs:
        raise fail("build", f"weights are not deterministic ({differs}): build the module under seeded(...)")
    dims = bp.dims
    corners = [{n: d.min for n, d in dims.items()}, {n: d.max for n, d in dims.items()}]
    with torch.no_grad():
        for sizes in [*corners, *bp.representative]:
            try:
                first(*example_inputs(bp, sizes))
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                shapes = ", ".join(f"{k}={v}" for k, v in bp.shapes(sizes).items())
                raise fail("inputs", f"module rejects declared shapes ({shapes}): {_describe(e)}") from e
