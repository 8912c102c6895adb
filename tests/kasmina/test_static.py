"""Kasmina never compiles: no module of it may mention the compile entry point or the compiler packages."""

from __future__ import annotations

import ast
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
    code = "import sys, esper_certify.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def kasmina_imports(package: Path, prefix: str) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's imports of sibling modules (function-local ones too; ``if TYPE_CHECKING:`` blocks are
    no import at run time), and every private name one module imports from another."""
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for m in modules:
        tree = ast.parse((package / f"{m}.py").read_text())
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            for alias in node.names:
                if isinstance(node, ast.Import):
                    target = alias.name.removeprefix(prefix + ".")
                elif node.module == prefix:
                    target = alias.name
                else:
                    target = (node.module or "").removeprefix(prefix + ".")
                    if alias.name.startswith("_") and target in modules:
                        private.append(f"{m} imports {target}.{alias.name}")
                if target in modules and target != m:
                    edges[m].add(target)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every module on an import cycle, as the path back to itself."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt == start:
                found.append([*path, nxt])
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                walk(start, nxt, [*path, nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return found


def test_kasmina_has_no_import_cycle_and_imports_no_private_name() -> None:
    edges, private = kasmina_imports(KASMINA, "esper.kasmina")
    assert "loader" in edges and "kinds" in edges["loader"]
    assert cycles(edges) == []
    assert private == []


def test_the_import_check_would_catch_a_function_local_cycle_and_a_private_import(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from pkg.b import helper\n")
    (tmp_path / "b.py").write_text("def helper():\n    from pkg.a import _secret\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    edges, private = kasmina_imports(tmp_path, "pkg")
    assert cycles(edges) == [["a", "b", "a"]]
    assert private == ["b imports a._secret"]
