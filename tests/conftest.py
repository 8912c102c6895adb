"""Shared fixtures: a tiny blueprint compiled once per session into a temporary Urza."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# The fixture folders live in tests/support.py; imported here too for modules that still take them from here.
from tests.support import BROKEN, CATALOG, FIXTURES, TINY, TRAINING

__all__ = ["BROKEN", "CATALOG", "FIXTURES", "TINY", "TRAINING"]


@pytest.fixture(scope="session", autouse=True)
def no_signing_keys_from_the_environment() -> Iterator[None]:
    """A CI job (or a developer) that signs with ESPER_SIGNING_KEY / verifies with ESPER_PUBLIC_KEY must not
    change what these tests store and load; tests/artifacts/test_signing.py configures keys where it tests them."""
    saved = {k: os.environ.pop(k) for k in ("ESPER_SIGNING_KEY", "ESPER_PUBLIC_KEY") if k in os.environ}
    yield
    os.environ.update(saved)


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
        assert entry.engine == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


def copy_of(urza: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the Urza at ``urza`` (database and artifacts) that a test may damage."""
    dest = tmp_path / "urza"
    shutil.copytree(urza.parent, dest, ignore=shutil.ignore_patterns("inductor-cache"))
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest / "urza.db"


@pytest.fixture
def urza_copy(compiled_urza: Path, tmp_path: Path) -> Path:
    """A private copy of the compiled Urza that a test may damage."""
    return copy_of(compiled_urza, tmp_path)


@pytest.fixture(scope="session", autouse=True)
def training_certification_off() -> Iterator[None]:
    """Certify runs inside this suite check inference only: training checks compile a training artifact per
    blueprint. tests/certification/test_training.py turns them on where it tests them."""
    env = "ESPER_CERTIFY_TRAINING"  # esper.certification.kinds.TRAINING_ENV, without importing torch here
    old = os.environ.get(env)
    os.environ.setdefault(env, "0")
    yield
    if old is None:
        os.environ.pop(env, None)


@pytest.fixture(scope="session")
def training_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    """A session Urza holding training artifacts marked certified: the catalog's ``lora_adapter`` (a frozen
    base weight) and ``tiny_bn`` (BatchNorm) compiled, and ``tiny_dropout``'s eager training route."""
    from esper.artifacts.kinds import ArtifactKind
    from esper.catalog import load_catalog
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    catalog = load_catalog([TRAINING, CATALOG])
    path = tmp_path_factory.mktemp("training-urza") / "urza.db"
    with Urza(path) as urza:
        tezzeret = Tezzeret(urza)
        for name in ("lora_adapter", "tiny_bn"):
            entry = tezzeret.compile(catalog.get(name), artifact=ArtifactKind.TRAINING).entry
            assert entry.engine == "aoti", entry.failure_reason
            urza.update(entry.id, status="certified")  # type: ignore[arg-type]
        assert tezzeret.compile(catalog.get("tiny_dropout"), artifact=ArtifactKind.TRAINING).entry.engine == "eager"
    return path


@pytest.fixture
def training_copy(training_urza: Path, tmp_path: Path) -> Path:
    """A private copy of the training Urza that a test may damage."""
    return copy_of(training_urza, tmp_path)
