"""The content hash decides whether Tezzeret compiles again: each thing an artifact depends on must change it.

No compile here: the hash and the source digest are computed from the declaration, the files and the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint
from esper.catalog import load_catalog
from esper.provenance import source_files
from esper.tezzeret.content import content_hash, source_digest

SOURCE = """
import torch

from esper.blueprint import Blueprint, Dim, Input, seeded


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build() -> torch.nn.Module:
    with seeded(0):
        return Tiny().eval()


HASHED = Blueprint(
    name="hashed",
    version=1,
    build=build,
    inputs=(Input("x", "float32", (Dim("batch", 1, 8), 4)),),
    representative=({"batch": 2},),
)
"""


@pytest.fixture
def declared(tmp_path: Path) -> Blueprint:
    folder = tmp_path / "blueprints"
    folder.mkdir()
    (folder / "hashed.py").write_text(SOURCE)
    return load_catalog([folder]).get("hashed")


def digest(bp: Blueprint, module: torch.nn.Module, **changes: object) -> str:
    args: dict[str, object] = {
        "artifact": ArtifactKind.INFERENCE,
        "settings": {},
        "ranges": {"batch": (1, 8)},
        "device": "cpu",
    }
    args.update(changes)
    return content_hash(bp, module, **args)  # type: ignore[arg-type]


def test_the_same_inputs_give_the_same_hash(declared: Blueprint) -> None:
    assert digest(declared, declared.build()) == digest(declared, declared.build())


def test_a_changed_weight_changes_the_hash(declared: Blueprint) -> None:
    module = declared.build()
    before = digest(declared, module)
    with torch.no_grad():
        module.fc.weight[0, 0] += 1e-6
    assert digest(declared, module) != before


def test_a_changed_source_file_changes_the_hash_and_the_source_digest(declared: Blueprint) -> None:
    module = declared.build()
    assert Path(declared.source) in source_files(declared, module)  # type: ignore[arg-type]
    before, before_source = digest(declared, module), source_digest(declared, module)
    path = Path(declared.source)  # type: ignore[arg-type]
    path.write_text(path.read_text() + "# an edit that changes no behaviour still means another source\n")
    assert digest(declared, module) != before
    assert source_digest(declared, module) != before_source


@pytest.mark.parametrize(
    "change",
    [
        {"settings": {"freezing": True}},
        {"ranges": {"batch": (1, 4)}},
        {"device": "cuda"},
        {"artifact": ArtifactKind.TRAINING},
    ],
    ids=["setting", "range", "device", "artifact kind"],
)
def test_a_changed_setting_range_device_or_kind_changes_the_hash(declared: Blueprint, change: dict) -> None:
    module = declared.build()
    assert digest(declared, module, **change) != digest(declared, module)


def test_the_source_digest_ignores_weights(declared: Blueprint) -> None:
    module = declared.build()
    before = source_digest(declared, module)
    with torch.no_grad():
        module.fc.weight.add_(1.0)
    assert source_digest(declared, module) == before


def test_an_unknown_artifact_kind_is_refused(declared: Blueprint) -> None:
    with pytest.raises(ValueError, match="'nonsense'"):
        digest(declared, declared.build(), artifact="nonsense")
