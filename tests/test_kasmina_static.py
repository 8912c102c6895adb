"""Kasmina never compiles: no module of it may mention the compile entry point or the compiler packages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import esper.kasmina

FORBIDDEN = re.compile(r"torch\.compile|_dynamo|_inductor|aoti_load_package")
KASMINA = Path(esper.kasmina.__file__).parent


def test_no_kasmina_module_mentions_the_compiler() -> None:
    files = sorted(KASMINA.rglob("*.py"))
    assert files, "Kasmina has no modules?"
    hits = [
        f"{f.name}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert hits == []


def test_the_static_check_would_catch_a_mention(tmp_path: Path) -> None:
    assert FORBIDDEN.search("import torch._inductor") and FORBIDDEN.search("torch.compile(model)")


def test_importing_kasmina_imports_no_compiler() -> None:
    code = (
        "import sys, esper.kasmina; "
        "print([m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_plugin_does_not_import_torch() -> None:
    code = "import sys, certify.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
