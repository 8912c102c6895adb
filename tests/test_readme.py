"""The README's set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    fence = lines.index("```bash")
    install, test = lines[fence + 1], lines[fence + 2]
    assert "pytest --certify" in install and "esper urza list" in install
    assert test in ROOT.joinpath(".ci/run").read_text().splitlines()
