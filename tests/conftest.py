"""Shared fixtures: a tiny blueprint compiled once per session into a temporary Urza."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
BROKEN = FIXTURES / "broken"


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Inductor cache for the whole session, so each tiny graph is compiled by Inductor once."""
    folder = Path(os.environ.get("ESPER_TEST_INDUCTOR_CACHE") or tmp_path_factory.mktemp("inductor-cache"))
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_catalog():  # type: ignore[no-untyped-def]
    from esper.catalog import load_catalog

    return load_catalog([TINY])


@pytest.fixture(scope="session")
def compiled_urza(tmp_path_factory: pytest.TempPathFactory, tiny_catalog, inductor_cache) -> Path:  # type: ignore[no-untyped-def]
    """A session Urza holding ``tiny_mlp`` compiled once with AOTInductor and marked certified."""
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    path = tmp_path_factory.mktemp("urza") / "urza.db"
    with Urza(path) as urza:
        entry = Tezzeret(urza).compile(tiny_catalog.get("tiny_mlp")).entry
        assert entry.kind == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


@pytest.fixture
def urza_copy(compiled_urza: Path, tmp_path: Path) -> Path:
    """A private copy of the compiled Urza (database and artifacts) that a test may damage."""
    dest = tmp_path / "urza"
    shutil.copytree(compiled_urza.parent, dest, ignore=shutil.ignore_patterns("inductor-cache"))
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest / "urza.db"
