"""The README's set-up commands are what CI runs, and they install what they use."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def setup_commands() -> tuple[str, str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    fence = lines.index("```bash")
    return lines[fence + 1], lines[fence + 2]


def test_ci_runs_the_readme_test_command() -> None:
    install, test = setup_commands()
    assert "pytest --certify" in install and "esper urza list" in install
    assert test in ROOT.joinpath(".ci/run").read_text().splitlines()


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
