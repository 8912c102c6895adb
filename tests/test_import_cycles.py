"""No import cycle, inside a package or between packages, in any package folder of the repository (the
import-cycle tool, tests/import_cycles.py, run over every top-level folder that holds Python code)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = Path(__file__).with_name("import_cycles.py")
# Build outputs are copies of the packages, not packages of their own.
NOT_SOURCE = {"build", "dist"}
# What drives the library: pytest and the plugin, by its folder's name and by its installed one.
DRIVERS = ("pytest", "_pytest", "certify", "esper_certify")


def package_folders(root: Path) -> list[str]:
    """Every top-level folder holding Python code, but hidden folders and build outputs."""
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir()
        and not d.name.startswith((".", "_"))
        and d.name not in NOT_SOURCE
        and not d.name.endswith(".egg-info")
        and any(d.rglob("*.py"))
    )


def run_tool(root: Path, folders: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *folders], cwd=root, capture_output=True, text=True)


def test_no_package_of_the_repository_has_an_import_cycle() -> None:
    folders = package_folders(ROOT)
    assert {"esper", "certify", "tests", "benchmarks", "examples", "blueprints"} <= set(folders)
    done = run_tool(ROOT, folders)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 import cycles, 0 private cross-module imports" in done.stdout


def test_the_tool_would_catch_a_cycle_between_two_packages(tmp_path: Path) -> None:
    for name, other in (("lib", "plugin"), ("plugin", "lib")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "core.py").write_text(f"def f():\n    from {other}.core import f\n")
    done = run_tool(tmp_path, package_folders(tmp_path))
    assert done.returncode == 1 and "package lib <-> package plugin" in done.stdout


def test_nothing_under_esper_imports_pytest_or_the_plugin() -> None:
    """The library is driven by pytest (through certify/), never the other way round."""
    hits = []
    for path in sorted((ROOT / "esper").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            hits += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in DRIVERS]
    assert hits == []
