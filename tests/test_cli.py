"""The ``esper`` CLI mirrors the library: help everywhere, listings as table/JSON/NL, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import Blueprint
from esper.cli import cli
from esper.tezzeret.compiler import CompileOutcome
from esper.urza import Urza
from tests.support import TINY, make_entry


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += commands(cmd, (*prefix, name))
    return out


@pytest.mark.parametrize("path", commands(cli), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("Usage:") and any(line.strip() for line in lines[2:4]), result.output


@pytest.mark.compiles
def test_list_and_show(compiled_urza: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["urza", "list", "--urza", str(compiled_urza)])
    assert table.exit_code == 0 and "tiny_mlp" in table.output and "certified" in table.output
    rows = json.loads(runner.invoke(cli, ["urza", "list", "--json", "--urza", str(compiled_urza)]).output)
    assert [(r["blueprint"], r["artifact"], r["status"], r["engine"]) for r in rows] == [
        ("tiny_mlp", "inference", "certified", "aoti")
    ]
    assert set(rows[0]["p50_ms"]) == {"batch=4", "batch=16"}
    nl = runner.invoke(cli, ["urza", "list", "--nl", "--urza", str(compiled_urza)]).output.splitlines()
    assert json.loads(nl[0]) == rows[0]
    shown = json.loads(runner.invoke(cli, ["urza", "show", "tiny_mlp", "--json", "--urza", str(compiled_urza)]).output)
    assert shown[0]["guards"]["inputs"][0]["dims"][0] == {"name": "batch", "min": 1, "max": 32}
    assert shown[0]["compat"]["device_type"] == "cpu" and shown[0]["artifact"] == "inference"
    assert "artifact" in table.output.splitlines()[0]
    training = runner.invoke(cli, ["urza", "list", "--artifact", "training", "--json", "--urza", str(compiled_urza)])
    assert training.exit_code == 0 and json.loads(training.output) == []


@pytest.mark.compiles
def test_compile_reuses_an_unchanged_blueprint(urza_copy: Path) -> None:
    args = ["compile", "tiny_mlp", "--artifact", "inference", "--blueprints", str(TINY), "--urza", str(urza_copy)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "tiny_mlp [inference default/default]: entry #1 certified, reused"


class RecordingTezzeret:
    """Stands in for Tezzeret: records what ``esper compile`` asks for and publishes one entry per kind."""

    calls: list[tuple[str, tuple[ArtifactKind, ...], bool]] = []

    def __init__(self, urza: Urza, *, device: str = "cpu"):
        self.urza = urza

    def compile_candidates(
        self, bp: Blueprint, *, artifacts: tuple[ArtifactKind, ...] = tuple(ArtifactKind), force: bool = False
    ) -> list[CompileOutcome]:
        self.calls.append((bp.name, artifacts, force))
        folder = self.urza.path.parent
        return [
            CompileOutcome(make_entry(self.urza, folder, name=bp.name, content=k.encode(), artifact=k), False, 1.25)
            for k in artifacts
        ]


def test_compile_builds_every_artifact_kind_and_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("esper.tezzeret.compiler.Tezzeret", RecordingTezzeret)
    monkeypatch.setattr(RecordingTezzeret, "calls", [])
    runner = CliRunner()
    base = ["compile", "tiny_mlp", "--blueprints", str(TINY), "--urza", str(tmp_path / "urza.db")]
    result = runner.invoke(cli, base)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "tiny_mlp [inference default/default]: entry #1 compiled, aoti in 1.2s",
        "tiny_mlp [training default/default]: entry #2 compiled, aoti in 1.2s",
    ]
    only = runner.invoke(cli, [*base, "--artifact", "training", "--artifact", "training", "--force"])
    assert only.exit_code == 0 and only.output.startswith("tiny_mlp [training default/default]: entry #3"), only.output
    assert RecordingTezzeret.calls == [
        ("tiny_mlp", (ArtifactKind.INFERENCE, ArtifactKind.TRAINING), False),
        ("tiny_mlp", (ArtifactKind.TRAINING,), True),
    ]
    bad = runner.invoke(cli, [*base, "--artifact", "backward"])
    assert bad.exit_code == 2 and "'backward' is not one of 'inference', 'training'" in bad.output


def test_unknown_blueprint_and_missing_entry_are_clean_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", "nope", "--blueprints", str(TINY), "--urza", str(tmp_path / "u.db")])
    assert result.exit_code == 1 and "unknown blueprint 'nope'" in result.output
    Urza(tmp_path / "u.db").close()
    result = runner.invoke(cli, ["urza", "show", "nope", "--urza", str(tmp_path / "u.db")])
    assert result.exit_code == 1 and "Urza has no entry for 'nope'" in result.output


def test_corrupt_database_is_a_clean_error_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "urza.db"
    db.write_bytes(b"garbage" * 64)
    result = CliRunner().invoke(cli, ["urza", "list", "--urza", str(db)])
    assert result.exit_code == 1 and "not a usable Urza database" in result.output
    assert "Traceback" not in result.output
    assert db.read_bytes() == b"garbage" * 64


def test_bad_option_values_are_argparse_style_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["urza", "list", "--urza", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder; give the database file" in result.output
    result = CliRunner().invoke(cli, ["compile", "--blueprints", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_compile_reports_hostile_blueprint_files_by_name_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file calling sys.exit(3) or declaring a path as its name is reported by file name;
    ``esper compile`` neither exits with the file's status nor stops the rest of the catalog."""
    (tmp_path / "pyproject.toml").write_text('[tool.esper]\nblueprint-paths = ["bps"]\n')
    bps = tmp_path / "bps"
    bps.mkdir()
    (bps / "quits.py").write_text("import sys\nsys.exit(3)\n")
    (bps / "evil.py").write_text((TINY / "tiny_mlp.py").read_text().replace('name="tiny_mlp"', 'name="../../etc/evil"'))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["compile", "--urza", str(tmp_path / "urza.db")])
    assert result.exit_code == 1, result.output
    assert "quits.py" in result.output and "SystemExit: 3" in result.output
    assert "evil.py" in result.output and "'../../etc/evil' must match" in result.output


def damaged_library(tmp_path: Path) -> Path:
    """An Urza of three certified rows (each with its own artifact) plus one whose meta does not parse and
    one whose failure_reason is not UTF-8."""
    import sqlite3

    db = tmp_path / "lib" / "urza.db"
    with Urza(db, signer=None) as urza:
        for i in range(3):
            make_entry(urza, tmp_path, name=f"bp{i}", content=f"artifact {i}".encode(), status="certified")
        make_entry(urza, tmp_path, name="bp3", content=b"artifact 3")
        make_entry(urza, tmp_path, name="bp4", content=b"artifact 4", status="rejected")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE entries SET meta = '{not json' WHERE id = 4")
    conn.execute("UPDATE entries SET failure_reason = CAST(? AS TEXT) WHERE id = 5", [b"A\xffB"])
    conn.commit()
    conn.close()
    return db


def test_list_reports_an_unparseable_row_as_one_line_and_goes_on(tmp_path: Path) -> None:
    db = damaged_library(tmp_path)
    result = CliRunner().invoke(cli, ["urza", "list", "--json", "--urza", str(db)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [r["blueprint"] for r in json.loads(result.stdout)] == ["bp2", "bp1", "bp0"]
    errors = result.stderr.splitlines()
    assert [line.split(" (")[0] for line in errors[:2]] == ["entry #5", "entry #4"]
    assert errors[-1] == "2 unreadable entries left out of the listing"


def test_gc_dry_run_reports_an_undecodable_row_and_goes_on(tmp_path: Path) -> None:
    db = damaged_library(tmp_path)
    result = CliRunner().invoke(cli, ["urza", "gc", "--dry-run", "--grace", "0", "--urza", str(db)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "unreadable entry #5 (bp4)" in result.output and "would remove 0 file(s)" in result.output


def test_verify_export_and_merge_report_every_row_whose_artifact_cannot_be_read(tmp_path: Path) -> None:
    """``objects/`` replaced by a file: every row's artifact read fails with an OSError; each is one line."""
    import shutil

    db = damaged_library(tmp_path)
    shutil.rmtree(db.parent / "objects")
    (db.parent / "objects").write_text("not a folder")
    runner = CliRunner()
    verify = runner.invoke(cli, ["urza", "verify", "--urza", str(db)])
    assert verify.exit_code == 1 and "Traceback" not in verify.output
    for i in range(1, 6):
        assert f"entry #{i} " in verify.output
    assert "5 entries checked, 5 problem(s)" in verify.output
    export = runner.invoke(cli, ["urza", "export", str(tmp_path / "snap"), "--urza", str(db)])
    assert export.exit_code == 1 and "Traceback" not in export.output
    assert [line.split(" (")[0] for line in export.stderr.splitlines()[:3]] == [
        "PROBLEM: entry #1",
        "PROBLEM: entry #2",
        "PROBLEM: entry #3",
    ]
    assert "3 certified entries cannot be exported" in export.output and not (tmp_path / "snap").exists()
    merge = runner.invoke(cli, ["urza", "merge", str(db), "--into", str(tmp_path / "merged.db")])
    assert merge.exit_code == 1 and "Traceback" not in merge.output
    refused = [line for line in merge.output.splitlines() if line.startswith("refused ")]
    assert len(refused) == 5 and "5 refused" in merge.output
