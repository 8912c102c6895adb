"""Fixtures of the performance suite: the catalog, a benchmark Urza, and the figures it writes at the end.

Run with ``.venv/bin/pytest benchmarks`` (README). Figures go to ``.esper/bench/``: ``perf.json``,
``perf.md`` and one ``latency_<blueprint>.png`` per blueprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from benchmarks.figures import write_outputs

if TYPE_CHECKING:  # esper is imported once the session has byte-compiled it
    from esper.catalog import Catalog

ROOT = Path(__file__).parents[1]
CATALOG = ROOT / "blueprints"
OUT = ROOT / ".esper" / "bench"


@pytest.fixture(scope="session", autouse=True)
def bytecode() -> None:
    """Byte-compile Esper first, as installing a wheel does: P1 and P5 time imports in fresh processes, and
    where ``PYTHONDONTWRITEBYTECODE`` is set (this CI-class machine sets it) each would otherwise compile every
    module from source (``import esper.kasmina`` 140 ms instead of about 30)."""
    import compileall

    for package in ("esper", "certify"):
        compileall.compile_dir(ROOT / package, quiet=1)


@pytest.fixture(scope="session")
def out_dir() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT


@pytest.fixture(scope="session")
def results(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Every figure the suite measures; written out (JSON, Markdown, plots) when the session ends."""
    figures: dict[str, Any] = {"P1": {}, "P2": {}, "P2grid": {}, "P3": {}, "P4": {}, "P5": {}, "sweep": {}}
    yield figures
    write_outputs(figures, out_dir)
    (out_dir / "perf.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    from esper.catalog import load_catalog

    return load_catalog([CATALOG])


@pytest.fixture(scope="session")
def bench_urza(out_dir: Path) -> Path:
    """The Urza the suite certifies into (P4) and measures from (P1-P3)."""
    return out_dir / "urza.db"


@pytest.fixture(scope="session")
def bench_env(out_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CI", None)
    env["ESPER_URZA"] = str(out_dir / "urza.db")
    return env
