"""Where things are: the Urza path, the blueprint folders and the budget profile.

Resolution order, most specific first: explicit option, environment (``ESPER_URZA``), ``[tool.esper]`` in
the nearest ``pyproject.toml``, then the default (``.esper/urza.db`` and ``blueprints/`` beside it).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_URZA = Path(".esper") / "urza.db"
DEFAULT_BLUEPRINTS = Path("blueprints")
DEFAULT_BUDGET_PROFILE = "cpu-2core"
URZA_ENV = "ESPER_URZA"


class SettingsError(ValueError):
    """A setting is malformed (bad pyproject section, a blueprint folder that does not exist)."""


@dataclass(frozen=True)
class Settings:
    """Resolved, absolute settings."""

    root: Path
    urza: Path
    blueprint_paths: tuple[Path, ...]
    budget_profile: str


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding a ``pyproject.toml`` (else ``start`` itself)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


def read_tool_config(root: Path) -> dict[str, Any]:
    """The ``[tool.esper]`` table of ``root/pyproject.toml`` (empty if absent)."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: {e}") from e
    section = data.get("tool", {}).get("esper", {})
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: [tool.esper] must be a table")
    return section


def resolve(
    *,
    urza: str | Path | None = None,
    blueprint_paths: Iterable[str | Path] = (),
    budget_profile: str | None = None,
    root: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Combine options, environment and ``[tool.esper]`` into :class:`Settings`."""
    env = os.environ if environ is None else environ
    root = find_project_root(root)
    tool = read_tool_config(root)
    configured = tool.get("blueprint-paths", [])
    if not isinstance(configured, list) or not all(isinstance(p, str) for p in configured):
        raise SettingsError(f"{root / 'pyproject.toml'}: [tool.esper] blueprint-paths must be a list of strings")
    paths = [root / p for p in configured]
    if not paths and (root / DEFAULT_BLUEPRINTS).is_dir():
        paths.append(root / DEFAULT_BLUEPRINTS)
    paths += [Path(p) if Path(p).is_absolute() else Path.cwd() / p for p in blueprint_paths]
    for p in paths:
        if not p.is_dir():
            raise SettingsError(f"blueprint folder {p} does not exist")
    chosen = urza or env.get(URZA_ENV) or tool.get("urza") or DEFAULT_URZA
    urza_path = Path(chosen)
    if not urza_path.is_absolute():
        urza_path = (Path.cwd() if (urza or env.get(URZA_ENV)) else root) / urza_path
    profile = budget_profile or tool.get("budget-profile") or DEFAULT_BUDGET_PROFILE
    return Settings(
        root=root,
        urza=urza_path.resolve(),
        blueprint_paths=tuple(dict.fromkeys(p.resolve() for p in paths)),
        budget_profile=str(profile),
    )
