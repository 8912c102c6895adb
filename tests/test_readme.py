"""The README's set-up commands are what CI runs, they install what they use, and its quick start works.

The quick start is run as a newcomer runs it: each ``python`` block is saved under the path its first line
names, each ``bash`` block is run line by line in a fresh folder whose ``.venv`` is this interpreter's
environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
QUICK_START = "## Quick start"
# What the quick start prints when Kasmina serves a certified decision: compiled entries, or an eager route
# certification chose by measurement. A fallback (no certified entry, a refused row) names another reason.
ROUTE_LINE = re.compile(
    r"^route: (?P<route>compiled|eager) \((?P<reason>certified entries #\d+(, #\d+)*"
    r"|certification measured eager as fastest)\); this call ran (?P<path>compiled|eager)$",
    re.MULTILINE,
)


def setup_commands() -> tuple[str, str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    fence = lines.index("```bash")
    return lines[fence + 1], lines[fence + 2]


def test_ci_runs_the_readme_test_command() -> None:
    install, test = setup_commands()
    assert "pytest --certify" in install and "esper urza list" in install
    assert test in ROOT.joinpath(".ci/run").read_text().splitlines()


@pytest.mark.parametrize("failing", ["pip", "pytest", "miscompiles", "certify"])
def test_ci_fails_when_any_step_of_the_test_command_fails(tmp_path: Path, failing: str) -> None:
    # The README's command is an && list, where `set -e` does not stop the script: CI must still fail.
    _, test = setup_commands()
    steps = {"pip": "true", "pytest": "true", "miscompiles": "true", "certify": "true", failing: "false"}
    stand_in = " && ".join(steps[s] for s in ("pip", "pytest", "miscompiles", "certify"))
    script = ROOT.joinpath(".ci/run").read_text().replace(test, stand_in)
    script = script.replace('cd "$(dirname "$0")/.."', "").replace(".venv/bin/mypy", "echo type-checked")
    (tmp_path / "run").write_text(script)
    done = subprocess.run(["bash", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode != 0 and "type-checked" not in done.stdout


def test_ci_passes_when_every_step_passes(tmp_path: Path) -> None:
    _, test = setup_commands()
    script = ROOT.joinpath(".ci/run").read_text().replace(test, "true && true && true && true")
    script = script.replace('cd "$(dirname "$0")/.."', "").replace(".venv/bin/mypy", "echo type-checked")
    (tmp_path / "run").write_text(script)
    done = subprocess.run(["bash", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0 and "type-checked" in done.stdout


def extras_of(extra: str, table: dict[str, list[str]]) -> set[str]:
    """The distributions an extra of this project installs, its own extras (``esper[a,b]``) followed."""
    out: set[str] = set()
    for req in table[extra]:
        name, _, rest = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req).groups()  # type: ignore[union-attr]
        if name == "esper":
            for inner in rest.split(","):
                out |= extras_of(inner.strip(), table)
        else:
            out.add(name.lower())
    return out


def test_the_readme_commands_install_the_harness_and_the_plots() -> None:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in project["dependencies"]}  # type: ignore[union-attr]
    assert not runtime & {"pytest", "pytest-benchmark", "hypothesis", "matplotlib"}, "the runtime install is lean"
    for command in setup_commands():
        (extra,) = re.findall(r"-e '\.\[(\w+)\]'", command)
        assert extras_of(extra, extras) >= {"pytest", "pytest-benchmark", "hypothesis", "matplotlib", "pytest-xdist"}


# -- the quick start ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced block of the quick start: its language and its text."""

    lang: str
    text: str


def quick_start_blocks(readme: str) -> list[Block]:
    """The fenced blocks of the README's quick start section, in order."""
    start = readme.index(f"\n{QUICK_START}\n")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end >= 0 else len(readme)]
    return [
        Block(m["lang"], m["body"]) for m in re.finditer(r"^```(?P<lang>\w+)\n(?P<body>.*?)^```$", section, re.M | re.S)
    ]


def file_of(block: Block) -> Path:
    """Where a quick-start Python block is saved: the relative path its first line names (``# path.py``)."""
    first = block.text.splitlines()[0]
    match = re.fullmatch(r"# (\S+\.py)", first)
    if match is None or Path(match[1]).is_absolute() or ".." in Path(match[1]).parts:
        raise ValueError(f"a quick-start Python block must start with '# relative/path.py', not {first!r}")
    return Path(match[1])


def run_quick_start(blocks: list[Block], folder: Path) -> str:
    """Save the Python blocks and run the shell lines in ``folder``; the output of every command."""
    # The whole environment, not only its bin folder: Python finds its venv from the path it was started by.
    folder.joinpath(".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = []
    for block in blocks:
        if block.lang == "python":
            path = folder / file_of(block)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text)
        elif block.lang == "bash":
            for line in block.text.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                done = subprocess.run(
                    ["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True, timeout=600, check=False
                )
                assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
                out.append(done.stdout)
    return "".join(out)


def test_the_quick_start_blocks_are_a_blueprint_a_certification_and_a_call() -> None:
    blocks = quick_start_blocks(ROOT.joinpath("README.md").read_text())
    assert [b.lang for b in blocks] == ["python", "bash", "python", "bash", "text"]
    assert "esper certify" in blocks[1].text and "Kasmina(" in blocks[2].text and ".load(" in blocks[2].text
    assert file_of(blocks[0]).parent != file_of(blocks[2]).parent, "the call script must not sit among blueprints"
    assert ROUTE_LINE.search(blocks[4].text), "the output the README shows is what the quick start prints"


def test_a_fallback_or_a_missing_line_does_not_pass_for_a_route() -> None:
    served = "route: eager (certification measured eager as fastest); this call ran eager\n"
    assert ROUTE_LINE.search(served)
    assert ROUTE_LINE.search("route: compiled (certified entries #1, #3); this call ran compiled")
    assert not ROUTE_LINE.search("route: eager (no certified entry for 'tiny_mlp'); this call ran eager")
    assert not ROUTE_LINE.search("Traceback (most recent call last):")


def test_a_python_block_must_name_a_relative_path() -> None:
    assert file_of(Block("python", "# quickstart/call.py\nimport torch\n")) == Path("quickstart/call.py")
    for first in ("import torch", "# /etc/passwd.py", "# ../outside.py"):
        with pytest.raises(ValueError, match="must start with"):
            file_of(Block("python", first + "\n"))


@pytest.mark.compiles
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    output = run_quick_start(quick_start_blocks(ROOT.joinpath("README.md").read_text()), tmp_path)
    served = ROUTE_LINE.search(output)
    assert served is not None, output
    # A compiled route ran compiled code for a call inside its guards; an eager route ran eager.
    assert served["path"] == served["route"], output
    assert re.search(rf"profile default, variant default: {served['route']}", output), output
