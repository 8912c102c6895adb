"""``esper report`` renders from Urza alone, one section per artifact kind: a training step's figures are
never drawn or tabulated with a forward call's, and the runtime install says what to add for the plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.artifacts.compat import current
from esper.artifacts.kinds import ArtifactKind
from esper.cli import cli
from esper.report import collect, render, series
from esper.urza import Entry, Urza
from tests.support import make_entry


def figures(compiled: float, eager: float) -> dict[str, object]:
    return {
        "certify": {
            "batch=4": {
                "compiled": {"p50_ms": compiled, "p95_ms": compiled * 1.5},
                "eager": {"p50_ms": eager, "p95_ms": eager * 1.5},
                "ratio": compiled / eager,
            }
        }
    }


def publish(urza: Urza, tmp_path: Path, artifact: ArtifactKind) -> Entry:
    fast = artifact == ArtifactKind.INFERENCE
    return make_entry(
        urza,
        tmp_path,
        name="mlp",
        content=artifact.encode(),
        artifact=artifact,
        status="certified",
        performance=figures(0.01, 0.02) if fast else figures(0.5, 0.9),
        meta={"representative": [{"batch": 4}]},
    )


# Both publication orders: before the report kept the kinds apart, whichever row came last set the one
# `eager` series, so one of the two orders drew training's eager step as inference's eager forward.
@pytest.mark.parametrize("first", list(ArtifactKind), ids=lambda k: f"{k}-first")
def test_training_is_its_own_section_never_an_inference_series(tmp_path: Path, first: ArtifactKind) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        order = [first, *(k for k in ArtifactKind if k != first)]
        ids = {k: publish(urza, tmp_path, k).id for k in order}
        (ev,) = collect(urza, current())
    inference, training = ev.of(ArtifactKind.INFERENCE), ev.of(ArtifactKind.TRAINING)
    assert inference is not None and training is not None
    assert [e.id for e in inference.routes] == [ids[ArtifactKind.INFERENCE]]
    assert [e.id for e in training.routes] == [ids[ArtifactKind.TRAINING]]
    assert series(inference) == ("batch", {"eager": {4: 0.02}, "default": {4: 0.01}, "routed": {4: 0.01}})
    assert series(training) == ("batch", {"eager": {4: 0.9}, "default": {4: 0.5}, "routed": {4: 0.5}})

    md, page = render(db, tmp_path / "out", current())
    text = md.read_text()
    _, sections = text.split("### inference\n")
    inference_md, training_md = sections.split("### training\n")
    assert "per forward call" in inference_md and "per training step" in training_md
    assert (
        f"#{ids[ArtifactKind.INFERENCE]} |" in inference_md and f"#{ids[ArtifactKind.TRAINING]} |" not in inference_md
    )
    assert f"#{ids[ArtifactKind.TRAINING]} |" in training_md and "batch=4: 0.5 (0.56x)" in training_md
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["mlp-inference.png", "mlp-training.png"]
    assert page.read_text().count("data:image/png;base64,") == 2


def test_a_blueprint_with_only_training_entries_has_no_inference_section(tmp_path: Path) -> None:
    db = tmp_path / "urza.db"
    with Urza(db, signer=None) as urza:
        publish(urza, tmp_path, ArtifactKind.TRAINING)
        (ev,) = collect(urza, current())
    assert [k.kind for k in ev.kinds] == [ArtifactKind.TRAINING]


def test_report_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Urza(tmp_path / "urza.db", signer=None) as urza:
        publish(urza, tmp_path, ArtifactKind.INFERENCE)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", "--urza", str(tmp_path / "urza.db"), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "matplotlib, which is not installed: pip install 'esper[report]'" in result.output
    assert not out.exists()


@pytest.mark.compiles
def test_report_renders_from_urza_without_compiling(urza_copy: Path, tmp_path: Path) -> None:
    with Urza(urza_copy) as urza:
        (e,) = urza.entries("tiny_mlp")
        perf = {
            "batch=4": {
                "compiled": {"p50_ms": 0.01, "p95_ms": 0.02},
                "eager": {"p50_ms": 0.02, "p95_ms": 0.03},
                "ratio": 0.5,
            }
        }
        urza.update(e.id, performance={**e.performance, "certify": perf})  # type: ignore[arg-type]
    code = (
        "import sys; from pathlib import Path; from esper.artifacts.compat import current; "
        "from esper.report import render; "
        f"render(Path({str(urza_copy)!r}), Path({str(tmp_path / 'out')!r}), current()); "
        "print(any(m.startswith(('torch._inductor', 'torch._dynamo')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "tiny_mlp" in page and "data:image/png;base64," in page
    assert "| default | default | aoti | certified (routed) |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.compiles
def test_a_route_table_is_drawn_and_listed_cell_by_cell(urza_copy: Path, tmp_path: Path) -> None:
    from esper.artifacts.compat import current
    from esper.report import render
    from esper.urza.evidence import ROUTE_TABLE, RegionCell, RouteTable

    cells = (
        RegionCell({"batch": 1}, "compiled", "wins", 0.5, 0.45, 0.55, 8, "wins"),
        RegionCell({"batch": 8}, "eager", "loses", 1.2, 1.1, 1.3, 8, "loses"),
        # A shared profile: another candidate serves this cell compiled, where this entry won too.
        RegionCell({"batch": 16}, "eager", "wins", 0.7, 0.6, 0.8, 8, "wins", served_by="default/other"),
        RegionCell({"batch": 32}, "eager", None, why="not measured (beyond the grid's budget)"),
    )
    table = RouteTable(("batch",), ((1, 8, 16, 32),), cells, 0.05)
    with Urza(urza_copy) as urza:
        (e,) = urza.entries("tiny_mlp")
        urza.update(e.id, meta={**e.meta, ROUTE_TABLE: table.to_json()})  # type: ignore[arg-type]
    md_path, _ = render(urza_copy, tmp_path / "out", current())
    md = md_path.read_text()
    assert "regional: compiled in 1 of 4 cells, cuts [(3, 12, 23)]" in md
    assert "- batch=1: 0.5x [0.45, 0.55] wins -> compiled" in md
    assert "- batch=8: 1.2x [1.1, 1.3] loses -> eager" in md
    assert "- batch=16: 0.7x [0.6, 0.8] wins -> compiled by default/other" in md
    assert "- batch=32: not measured (beyond the grid's budget) -> eager" in md
    assert (tmp_path / "out" / "tiny_mlp-inference-regions.png").stat().st_size > 0
