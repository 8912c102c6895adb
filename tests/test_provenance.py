"""Stale code: a cheap, torch-free digest of a blueprint's declaring source files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from esper.catalog import load_file
from esper.provenance import current_source_digest, digest_files, source_files, stale_reason
from tests.support import good, write

HELPER = """
import torch

class Helper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x)
"""

USES_HELPER = """
import torch
from esper.blueprint import Blueprint, Dim, Input, seeded
from {helper} import Helper

def build():
    with seeded(0):
        return Helper().eval()

LIN = Blueprint(name="lin", version=1, build=build,
    inputs=(Input("x", "float32", (Dim("batch", 1, 16), 8)),), representative=({{"batch": 4}},))
"""


def test_editing_the_declaring_file_changes_the_digest(tmp_path: Path) -> None:
    path = write(tmp_path, "lin.py", good())
    (bp,) = load_file(path)
    recorded = current_source_digest(bp)
    assert stale_reason(bp, recorded) is None and stale_reason(bp, None) is None
    path.write_text(path.read_text().replace("nn.Linear(8, 4)", "nn.Linear(8, 4, bias=False)"))
    reason = stale_reason(bp, recorded)
    assert reason is not None and "source changed" in reason and "bump its version" in reason


def test_the_module_classes_files_count_and_torch_does_not(tmp_path: Path) -> None:
    helper = write(tmp_path, "helper_mod_x.py", HELPER)
    sys.path.insert(0, str(tmp_path))
    try:
        path = write(tmp_path / "bps", "lin.py", USES_HELPER.format(helper="helper_mod_x"))
        (bp,) = load_file(path)
        files = source_files(bp)
        assert files == sorted([path.resolve(), helper.resolve()])
        assert source_files(bp, bp.build()) == files  # the built module adds nothing torch-owned
        recorded = current_source_digest(bp)
        helper.write_text(HELPER.replace("Linear(8, 4)", "Linear(8, 4, bias=False)"))
        assert stale_reason(bp, recorded) is not None
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("helper_mod_x", None)
    assert not any(Path(torch.__file__).parent in f.parents for f in files)


def test_digest_is_length_prefixed_and_survives_a_missing_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("xy")
    b.write_text("z")
    before = digest_files([a, b])
    a.write_text("x")
    b.write_text("yz")
    assert digest_files([a, b]) != before
    b.unlink()
    assert digest_files([a, b]) != digest_files([a])  # a missing file is a change, not an exception


def test_the_stale_check_does_not_import_torch() -> None:
    code = "import sys, esper.provenance; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
