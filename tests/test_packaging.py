"""``pip install esper`` is the runtime only: the wheel's own requirements leave out the certification
harness (pytest, hypothesis), the benchmarks' pytest-benchmark and the plots (matplotlib), which its extras add;
the wheel holds ``esper`` and the pytest plugin as ``esper_certify`` (never a top-level ``certify``); and in a fresh
venv that holds exactly the wheel and its runtime dependency closure, Kasmina loads a certified entry and the
``esper`` read commands work, while ``esper report`` says what to install.

The fresh venv does not download or copy torch: it sees the runtime closure's installed files (torch among
them) through a ``.pth`` file naming a folder of symlinks into this venv's site-packages, one per top-level
name that those distributions' RECORDs list, and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.support import TINY

ROOT = Path(__file__).parents[1]
HARNESS = ("pytest", "_pytest", "pytest_benchmark", "hypothesis", "matplotlib")
HARNESS_DISTS = {"pytest", "pytest-benchmark", "hypothesis", "matplotlib"}

pytestmark = pytest.mark.packaging


def _name(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the source tree (building in place would write build/ into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("esper", "certify"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", build, str(tmp / "dist")], cwd=src, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "dist" / out.stdout.strip().splitlines()[-1]


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def extra(wheel: Path, name: str) -> set[str]:
    return {_name(r.name) for r in requirements(wheel) if r.marker and r.marker.evaluate({"extra": name})}


def runtime_closure(wheel: Path) -> dict[str, metadata.Distribution]:
    """The distributions ``pip install esper`` installs besides esper, as installed in this venv."""
    todo = [r for r in requirements(wheel) if not r.marker or r.marker.evaluate({"extra": ""})]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if _name(req.name) in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a runtime dependency) is not installed in the test venv")
        seen[_name(req.name)] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return seen


def test_the_wheel_requires_the_runtime_and_offers_the_harness_as_extras(wheel: Path) -> None:
    runtime = {_name(r.name) for r in requirements(wheel) if not r.marker}
    assert runtime == {"torch", "numpy", "sqlite-utils", "safetensors", "click", "tabulate", "cryptography", "filelock"}
    assert extra(wheel, "certify") == {"pytest", "hypothesis"}, "certification needs pytest and hypothesis only"
    assert extra(wheel, "bench") == {"pytest-benchmark"}
    assert extra(wheel, "report") == {"matplotlib"}
    assert extra(wheel, "test") >= {"esper", "pytest-xdist", "ruff"}
    assert not HARNESS_DISTS & set(runtime_closure(wheel)), "a runtime dependency pulls in the test stack"


def test_the_wheel_holds_the_checkouts_packages_with_the_plugin_as_esper_certify(wheel: Path) -> None:
    """Every module of ``esper/`` and ``certify/`` is in the wheel (a package folder missing from pyproject's
    list is caught here), the plugin's folder under ``esper_certify`` and no top-level ``certify``."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = z.read(entry_points).decode()
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "esper").rglob("*.py")}
    source |= {f"esper_certify/{p.relative_to(ROOT / 'certify').as_posix()}" for p in (ROOT / "certify").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert "esper/py.typed" in names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"esper", "esper_certify"}
    assert "esper-certify = esper_certify.plugin" in entry_text.splitlines()


@pytest.fixture(scope="module")
def runtime_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel and, through a ``.pth`` file, exactly its runtime dependency closure."""
    tmp = tmp_path_factory.mktemp("runtime")
    env = tmp / "venv"
    venv.create(env, with_pip=False, symlinks=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    farm = tmp / "runtime-deps"
    farm.mkdir()
    for dist in runtime_closure(wheel).values():
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}:
            if not (farm / top).exists() and (base / top).exists():
                (farm / top).symlink_to(base / top)
    Path(purelib, "runtime-deps.pth").write_text(f"{farm}\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    out = subprocess.run([*install, str(wheel)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return env


def run(env: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run in the runtime venv, from a folder outside the checkout, with no path or key from this process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ESPER_", "VIRTUAL_ENV"))}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean, capture_output=True, text=True, check=False)


def test_the_installed_plugin_is_esper_certify_and_nothing_installs_certify(runtime_venv: Path, tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import importlib.util, json
        from importlib import metadata
        (ep,) = [e for e in metadata.entry_points(group="pytest11") if e.name == "esper-certify"]
        spec = importlib.util.find_spec(ep.module)
        print(json.dumps({"module": ep.module, "origin": spec and spec.origin,
                          "certify": importlib.util.find_spec("certify") is not None}))
    """)
    out = run(runtime_venv, runtime_venv / "bin" / "python", "-c", script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["module"] == "esper_certify.plugin" and not result["certify"]
    assert result["origin"].startswith(str(runtime_venv)), "the plugin was not found in the installed wheel"


@pytest.mark.compiles
def test_the_runtime_loads_a_certified_entry_without_the_test_stack(
    runtime_venv: Path, compiled_urza: Path, tmp_path: Path
) -> None:
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        harness = {list(HARNESS)!r}
        importable = [m for m in harness if importlib.util.find_spec(m) is not None]
        import torch
        import esper
        from esper.kasmina import COMPILED, Kasmina
        kernel = Kasmina({str(compiled_urza)!r}, blueprint_paths=[{str(TINY)!r}]).load("tiny_mlp")
        x = torch.randn(3, 8)
        with torch.no_grad():
            err = float((kernel(x) - kernel.eager_module()(x)).abs().max())
        print(json.dumps({{
            "importable": importable, "esper": esper.__file__, "route": kernel.route, "path": kernel.last_path,
            "err": err, "compiled": COMPILED,
        }}))
    """)
    out = run(runtime_venv, runtime_venv / "bin" / "python", "-c", script, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["importable"] == []
    assert result["esper"].startswith(str(runtime_venv)), "esper was not imported from the installed wheel"
    assert result["route"] == result["path"] == result["compiled"] and result["err"] <= 1e-5


@pytest.mark.compiles
def test_the_runtime_cli_reads_urza_and_names_the_report_extra(
    runtime_venv: Path, compiled_urza: Path, tmp_path: Path
) -> None:
    esper = runtime_venv / "bin" / "esper"
    listed = run(runtime_venv, esper, "urza", "list", "--json", "--urza", compiled_urza, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [(r["blueprint"], r["artifact"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("tiny_mlp", "inference", "certified")
    ]
    verified = run(runtime_venv, esper, "urza", "verify", "--urza", compiled_urza, cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.splitlines()[-1] == "1 entries checked: all ok", verified
    report = run(runtime_venv, esper, "report", "--urza", compiled_urza, "--out", tmp_path / "r", cwd=tmp_path)
    assert report.returncode == 1 and "pip install 'esper[report]'" in report.stderr, report
    assert "Traceback" not in report.stderr
