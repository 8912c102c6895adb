"""Helpers several test modules share (fixtures live in conftest.py): the fixture folders, oracles built from
the catalog independently of Kasmina, and the rows, files and training seeds tests make."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from esper.artifacts.compat import current
from esper.artifacts.guards import DimGuard, GuardSchema, InputGuard
from esper.catalog import Catalog, load_catalog
from esper.kasmina import Kasmina
from esper.urza import Entry, Urza

if TYPE_CHECKING:
    from esper.kasmina.training_kernel import TrainingKernel

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
BROKEN = FIXTURES / "broken"
TRAINING = FIXTURES / "training"
CATALOG = Path(__file__).parent.parent / "blueprints"


class CountingOps(TorchDispatchMode):
    """Counts every aten op it sees: a mode that eager runs through and compiled code would bypass."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


# -- oracles: the blueprint's own module, from its declaration, never from Kasmina -------------------------


@cache
def catalog_of(*folders: Path) -> Catalog:
    """The catalog of blueprint ``folders``, loaded once per test process."""
    return load_catalog(list(folders))


def blueprint_module(name: str, *folders: Path) -> torch.nn.Module:
    """The oracle: blueprint ``name``'s module declared in ``folders`` (default: the tiny fixtures), built
    with the blueprint's own seed and in eval mode, independently of Kasmina (a fresh catalog load, so that an
    edited file is read again)."""
    return load_catalog(list(folders or (TINY,))).get(name).build().eval()


def kasmina_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNING records Kasmina logged."""
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


# -- training: the catalog's training blueprints (the fixtures' and the shipped catalog's) ----------------


def training_catalog() -> Catalog:
    return catalog_of(TRAINING, CATALOG)


def load_training(urza: Path, name: str, weights: Any = None) -> TrainingKernel:
    """Kasmina's training kernel of ``name`` from ``urza``, over the training and shipped catalogs."""
    return Kasmina(urza, blueprint_paths=[TRAINING, CATALOG]).load_training(name, weights)


def build_training(name: str, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The training oracle: the blueprint's module from the catalog, with ``state`` loaded (in the mode its
    build leaves it in)."""
    module = training_catalog().get(name).build()
    if state is not None:
        module.load_state_dict(state)
    return module


def perturbed(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A seed's weights: the blueprint's state dict with its floating tensors moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in build_training(name).state_dict().items()
    }


# -- rows and blueprint files ----------------------------------------------------------------------------


def guards(lo: int = 1, hi: int = 4) -> GuardSchema:
    """Guards of the tiny blueprints' one input ``x``: ``batch`` in ``lo..hi`` by 8 features."""
    return GuardSchema(inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=lo, max=hi), DimGuard(size=8))),))


GUARDS = guards()


def make_entry(urza: Urza, tmp_path: Path, *, name: str = "b", content: bytes = b"artifact", **kw: object) -> Entry:
    """Publish a compiled row of blueprint ``name`` whose artifact is the bytes ``content``."""
    src = tmp_path / f"{name}-{hashlib.sha256(content).hexdigest()[:6]}.bin"
    src.write_bytes(content)
    checksum, size = urza.store.add(src)
    fields: dict[str, object] = dict(
        blueprint=name,
        blueprint_version=1,
        content_hash="c" * 64,
        compat=current(),
        engine="aoti",
        status="compiled",
        checksum=checksum,
        artifact_size=size,
        guards=GUARDS,
        parity={"representative": {"batch=2": {"max_abs": 0.0, "max_rel": 0.0}}},
        meta={"compile_seconds": 1.5},
    )
    fields.update(kw)
    return urza.publish(Entry(**fields))  # type: ignore[arg-type]


GOOD = """
import torch
from esper.blueprint import Blueprint, Dim, Input, seeded

def build():
    with seeded(0):
        return torch.nn.Linear(8, 4).eval()

{name_upper} = Blueprint(
    name="{name}", version=1, build=build,
    inputs=(Input("x", "float32", (Dim("batch", 1, 16), {features})),),
    representative=({{"batch": 4}},),
)
"""


def write(folder: Path, filename: str, text: str) -> Path:
    """Write ``text`` (dedented) to ``folder/filename``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(textwrap.dedent(text))
    return path


def good(name: str = "lin", features: int = 8) -> str:
    """The source of a valid one-Linear blueprint file."""
    return GOOD.format(name=name, name_upper=name.upper(), features=features)


def stand_in_certification(
    tmp_path: Path,
    bp: Any,
    kernel: Any,
    *,
    max_batch: int,
    meta: dict[str, Any] | None = None,
) -> Any:
    """An inference :class:`~esper.certification.run.Certification` of ``bp`` (one input ``x`` of shape
    ``(batch, 4)``, batch 1..``max_batch``) whose candidates are real Urza rows, so a failed check rejects its
    entry, but whose kernels are ``kernel()`` stand-ins instead of compiled code: the checks run as plain calls,
    nothing compiles. Only the blueprint's own profiles get a row: a specialization is compiled only where its
    base profile cannot stay dynamic."""
    from esper.artifacts.kinds import ArtifactKind
    from esper.certification.budgets import PROFILES
    from esper.certification.run import Certification
    from esper.profiles import is_specialization

    cert = Certification(bp, ArtifactKind.INFERENCE, tmp_path / "urza.db", PROFILES["cpu-2core"], recheck=True)
    schema = GuardSchema(
        inputs=(InputGuard("x", "float32", (DimGuard(name="batch", min=1, max=max_batch), DimGuard(size=4))),)
    )
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(b"stand-in")
    with Urza(cert.urza_path) as urza:
        checksum, size = urza.store.add(artifact)
        for c in (c for c in cert.candidates.values() if not is_specialization(c.profile)):
            entry = Entry(bp.name, 1, "c" * 64, current(), "aoti", "compiled", checksum, size, schema)
            c.entry = urza.publish(entry.with_(variant=c.variant, meta=dict(meta or {})))
            c.kernel = kernel()
    return cert


# -- seeded-defect projects certified end to end -------------------------------------------------------------


def certify_fixture_project(root: Path, files: Sequence[Path], *, training: bool) -> subprocess.CompletedProcess[str]:
    """``pytest --certify`` once in a fresh project at ``root`` whose blueprints are ``files``, into
    ``root / "urza.db"`` (training certified or not). A subprocess: torch's operator registrations cannot be
    imported twice into one process."""
    (root / "pyproject.toml").write_text('[tool.esper]\nblueprint-paths = ["bps"]\n')
    (root / "bps").mkdir()
    for file in files:
        shutil.copy(file, root / "bps" / file.name)
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "ESPER_CERTIFY_TRAINING": "1" if training else "0",
        "ESPER_HYPOTHESIS_PROFILE": "esper-ci",
        "PYTHONPATH": path,
    }
    command = [sys.executable, "-m", "pytest", "--certify", "--certify-urza", str(root / "urza.db")]
    return subprocess.run(
        [*command, "-p", "no:cacheprovider", "-q"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def entries_of(urza: Path, name: str, artifact: str = "inference") -> list[Entry]:
    """``name``'s entries of one artifact kind."""
    with Urza(urza, readonly=True) as u:
        return [e for e in u.entries(name) if e.artifact == artifact]


def rejected_by(urza: Path, name: str, check: str, artifact: str = "inference") -> str:
    """The failure reason of ``name``'s compiled entry, asserting that ``check`` rejected it and nothing of
    that kind is certified."""
    (entry,) = [e for e in entries_of(urza, name, artifact) if e.engine == "aoti"]
    assert (entry.status, entry.failed_check) == ("rejected", check), (name, artifact, entry.failure_reason)
    assert not [e for e in entries_of(urza, name, artifact) if e.status == "certified"]
    return entry.failure_reason or ""


def routed_certified(urza: Path, name: str, artifact: str = "inference") -> bool:
    """A certified route (the compiled entry, or an eager route chosen by measurement) and no check failed."""
    es = entries_of(urza, name, artifact)
    failed = [e.failed_check for e in es if e.failed_check not in (None, "selection")]
    return any(e.status == "certified" for e in es) and not failed
