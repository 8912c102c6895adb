"""The ``esper`` command: a thin mirror of the library (``esper compile`` -> :class:`Tezzeret`, ``esper urza``
-> :class:`Urza`). Each command resolves settings, calls one library method, and turns library errors into
clean CLI errors."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from esper.artifacts.kinds import ArtifactKind
from esper.blueprint import BlueprintError
from esper.options import click_option
from esper.settings import Settings, SettingsError, resolve
from esper.urza.schema import EntryStatus

if TYPE_CHECKING:
    from esper.certification.gate import Policy
    from esper.tezzeret.compiler import CompileOutcome


def _settings(urza: Path | None = None, blueprints: Iterable[Path] = (), budget_profile: str | None = None) -> Settings:
    try:
        return resolve(urza=urza, blueprint_paths=blueprints, budget_profile=budget_profile)
    except SettingsError as e:
        raise click.ClickException(str(e)) from e


def _open_urza(path: Path, *, readonly: bool) -> Any:
    from esper.urza import Urza, UrzaError

    try:
        return Urza(path, readonly=readonly)
    except UrzaError as e:
        raise click.ClickException(str(e)) from e


# Context meta key: how many rows a listing command left out because they could not be read (exit status 1).
LEFT_OUT = "esper.left_out"


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` / ``--nl`` / table, shared by every listing command (the command returns rows)."""

    @click.option("--json", "as_json", is_flag=True, help="output a JSON array")
    @click.option("--nl", is_flag=True, help="output newline-delimited JSON")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, nl: bool, **kwargs: Any) -> None:
        rows: list[dict[str, Any]] = fn(*args, **kwargs)
        left_out = click.get_current_context().meta.get(LEFT_OUT, 0)
        if as_json:
            click.echo(json.dumps(rows, indent=2, default=str))
        elif nl:
            for row in rows:
                click.echo(json.dumps(row, default=str))
        elif rows:
            from tabulate import tabulate

            click.echo(tabulate([_flat(r) for r in rows], headers="keys"))
        else:
            click.echo("(no entries)")
        if left_out:
            click.echo(f"{left_out} unreadable entr{'y' if left_out == 1 else 'ies'} left out of the listing", err=True)
            sys.exit(1)

    return wrapper


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Table cells: per-shape dicts become "a/b/c" in representative order."""
    return {
        k: "/".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v.values()) if isinstance(v, dict) else v
        for k, v in row.items()
        if not isinstance(v, list)
    }


class ReportedCommand(click.Command):
    """A command whose I/O failures (disk or database full, read-only file system, damaged database file) end
    as one line and exit status 1, never a traceback (``esper.io_errors``). Every ``esper`` command is one:
    :class:`EsperGroup` makes its commands of this class."""

    def invoke(self, ctx: click.Context) -> Any:
        from esper import io_errors

        with io_errors.reported(click.ClickException, ctx.command_path):
            return super().invoke(ctx)


class EsperGroup(click.Group):
    """A group whose commands are :class:`ReportedCommand` and whose subgroups are again :class:`EsperGroup`."""

    command_class = ReportedCommand
    group_class = type


@click.group(cls=EsperGroup)
@click.version_option(package_name="esper")
@click.option("-v", "--verbose", is_flag=True, help="log progress (INFO) to stderr")
def cli(verbose: bool) -> None:
    """Esper: compile blueprints ahead of time (Tezzeret), store them (Urza), load them (Kasmina)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


ARTIFACT_CHOICE = click.Choice([k.value for k in ArtifactKind])


@cli.command(name="compile")
@click.argument("names", nargs=-1)
@click_option("urza")
@click_option("blueprints")
@click_option("device")
@click.option(
    "--artifact",
    "artifacts",
    type=ARTIFACT_CHOICE,
    multiple=True,
    help="build only this artifact kind (repeatable; default: every kind)",
)
@click.option("--force", is_flag=True, help="compile even when Urza has an entry with the same content hash")
def compile_cmd(
    names: tuple[str, ...],
    urza: Path | None,
    blueprints: tuple[Path, ...],
    device: str | None,
    artifacts: tuple[str, ...],
    force: bool,
) -> None:
    """Compile blueprints (all by default) into Urza with Tezzeret: every artifact kind, and for inference every
    shape profile under every variant."""
    from esper.catalog import UnknownBlueprintError, load_catalog, validate_module
    from esper.tezzeret.compiler import Tezzeret

    kinds = tuple(ArtifactKind(a) for a in dict.fromkeys(artifacts)) or tuple(ArtifactKind)
    settings = _settings(urza, blueprints)
    catalog = load_catalog(settings.blueprint_paths, strict=False)
    for err in catalog.errors:
        click.echo(f"error: {err}", err=True)
    try:
        chosen = catalog.select(names)
        for bp in chosen:
            validate_module(bp)
    except (UnknownBlueprintError, BlueprintError) as e:
        raise click.ClickException(str(e)) from e
    with _open_urza(settings.urza, readonly=False) as store:
        tezzeret = Tezzeret(store, device=device or "cpu")
        for bp in chosen:
            for outcome in tezzeret.compile_candidates(bp, artifacts=kinds, force=force):
                click.echo(describe_outcome(bp.name, outcome))
    if catalog.errors:
        sys.exit(1)


def describe_outcome(name: str, outcome: CompileOutcome) -> str:
    """One line per compile outcome: blueprint, artifact kind, shape profile/variant, entry, what happened."""
    e = outcome.entry
    what = "reused" if outcome.reused else f"{e.engine} in {outcome.seconds:.1f}s"
    reason = f" ({e.failure_reason.splitlines()[0]})" if e.failure_reason else ""
    return f"{name} [{e.artifact} {e.profile}/{e.variant}]: entry #{e.id} {e.status}, {what}{reason}"


@cli.group()
def urza() -> None:
    """Inspect the Urza artifact library."""


def _summary(entry: Any) -> dict[str, Any]:
    """The entry's row as :class:`esper.urza.evidence.Evidence` reads it (the reader the report and the
    certification summary share)."""
    from esper.urza.evidence import summarize

    return summarize(entry)


@urza.command(name="list")
@click_option("urza")
@click.option("--blueprint", help="only this blueprint's entries")
@click.option("--status", type=click.Choice([s.value for s in EntryStatus]))
@click.option("--artifact", type=ARTIFACT_CHOICE, help="only entries of this artifact kind")
@output_options
def urza_list(
    urza: Path | None, blueprint: str | None, status: str | None, artifact: str | None
) -> list[dict[str, Any]]:
    """List entries, newest first, with their artifact kind and evidence. A row that cannot be read is one line
    on stderr and the listing goes on (exit 1 at the end, with their count)."""
    with _open_urza(_settings(urza).urza, readonly=True) as store:
        rows = store.stored_rows(blueprint, newest_first=True)
    listed, unreadable = [], []
    for row in rows:
        e = row.entry
        if e is None:
            if status is None or row.status == status:
                unreadable.append(f"entry #{row.id} ({row.blueprint}): unreadable row: {row.problem}")
        elif (status is None or e.status == status) and (artifact is None or str(e.artifact) == artifact):
            listed.append(_summary(e))
    for line in unreadable:
        click.echo(line, err=True)
    click.get_current_context().meta[LEFT_OUT] = len(unreadable)
    return listed


@urza.command(name="show")
@click.argument("name")
@click_option("urza")
@click.option("--json", "as_json", is_flag=True, help="output JSON")
def urza_show(name: str, urza: Path | None, as_json: bool) -> None:
    """Show every entry of blueprint NAME (or the entry with id NAME) in full."""
    from esper.urza import UrzaError

    with _open_urza(_settings(urza).urza, readonly=True) as store:
        try:
            entries = [store.get(int(name))] if name.isdigit() else store.entries(name)
        except UrzaError as e:
            raise click.ClickException(str(e)) from e
        if not entries:
            raise click.ClickException(f"Urza has no entry for {name!r}")
        # The stored columns in full, and the headline figures as the shared reader reads them.
        full = [{**e.to_dict(), "summary": _summary(e)} for e in entries]
    if as_json:
        click.echo(json.dumps(full, indent=2, default=str))
        return
    for row in full:
        click.echo(json.dumps(row, indent=2, default=str))


@urza.command(name="verify")
@click_option("urza")
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="also check each entry's signature with this public key (default: $ESPER_PUBLIC_KEY)",
)
def urza_verify(urza: Path | None, public_key: Path | None) -> None:
    """Check every entry's artifact file (present, whole, matching its sha256) and signature; exit 1 on problems."""
    from esper.artifacts.signing import SigningError, verifier_for
    from esper.urza.maintenance import verify

    try:
        verifier = verifier_for(public_key)
    except SigningError as e:
        raise click.ClickException(str(e)) from e
    with _open_urza(_settings(urza).urza, readonly=True) as store:
        report = verify(store, verifier)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(1)


@urza.command(name="gc")
@click_option("urza")
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@click.option(
    "--grace",
    "grace_seconds",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="only remove files older than this many seconds (a writer running now may still publish newer ones)",
)
def urza_gc(urza: Path | None, dry_run: bool, grace_seconds: float) -> None:
    """Remove artifact files that no entry names, and temporary files of interrupted writes."""
    from esper.urza.maintenance import collect_garbage

    with _open_urza(_settings(urza).urza, readonly=True) as store:
        report = collect_garbage(store, dry_run=dry_run, grace_seconds=grace_seconds)
    for line in report.lines():
        click.echo(line)


@urza.command(name="sign")
@click_option("urza")
def urza_sign(urza: Path | None) -> None:
    """Sign every entry whose artifact verifies with $ESPER_SIGNING_KEY (after turning signing on or rotating)."""
    from esper.urza import UrzaError
    from esper.urza.maintenance import sign_all

    with _open_urza(_settings(urza).urza, readonly=False) as store:
        try:
            report = sign_all(store)
        except UrzaError as e:
            raise click.ClickException(str(e)) from e
    for line in report.lines():
        click.echo(line)
    if report.skipped:
        sys.exit(1)


@urza.command(name="merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--into",
    "dest",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="the Urza database to merge into (created if missing)",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="take only rows signed by this key (default: $ESPER_PUBLIC_KEY); unsigned rows are refused",
)
def urza_merge(sources: tuple[Path, ...], dest: Path, public_key: Path | None) -> None:
    """Merge Urza libraries SOURCES (databases, or snapshot folders) and their artifacts into one (--into), e.g.
    one per machine class from a CI matrix. Duplicates are skipped; two different certified artifacts for one
    identity are a conflict, reported and never overwritten. Exit 1 on conflicts or refused rows."""
    from esper.artifacts.signing import SigningError, verifier_for
    from esper.urza import UrzaError
    from esper.urza.merge import merge

    try:
        verifier = verifier_for(public_key)
        report = merge(sources, dest, verifier=verifier)
    except (SigningError, UrzaError) as e:
        raise click.ClickException(str(e)) from e
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(1)


@urza.command(name="export")
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click_option("urza")
@click.option(
    "--snapshot-version",
    type=click.IntRange(min=1),
    help="the snapshot's version (default: one above the last exported from this Urza); must increase",
)
def urza_export(dest: Path, urza: Path | None, snapshot_version: int | None) -> None:
    """Write a self-contained, read-only snapshot (certified entries and their artifacts) to folder DEST, with
    its version in snapshot.json, signed with $ESPER_SIGNING_KEY when set (readers refuse older versions with
    ESPER_MIN_SNAPSHOT)."""
    from esper.urza import UrzaError
    from esper.urza.maintenance import ExportError, export

    with _open_urza(_settings(urza).urza, readonly=True) as store:
        try:
            report = export(store, dest, version=snapshot_version)
        except ExportError as e:
            for line in e.problems:
                click.echo(f"PROBLEM: {line}", err=True)
            n = len(e.problems)
            raise click.ClickException(
                f"nothing exported: {n} certified entr{'y' if n == 1 else 'ies'} cannot be exported; "
                "run `esper urza verify`"
            ) from e
        except UrzaError as e:
            raise click.ClickException(str(e)) from e
    signed = "signed" if report.signed else "unsigned: no $ESPER_SIGNING_KEY, readers requiring a version refuse it"
    click.echo(
        f"exported {report.entries} certified entries and {report.artifacts} artifacts ({report.bytes} bytes) "
        f"to {report.path} as snapshot version {report.version} ({signed}); readers: "
        f"Kasmina({str(report.path / 'urza.db')!r}) or ESPER_URZA={report.path / 'urza.db'}"
        f" (and ESPER_MIN_SNAPSHOT={report.version} to refuse older snapshots)"
    )


@cli.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="folder for esper-signing.key (private, mode 0600) and esper-signing.pub",
)
def keygen(out_dir: Path) -> None:
    """Create an Ed25519 key pair for signing Urza entries (never overwrites an existing key)."""
    from esper.artifacts.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, SigningError, generate_keypair

    try:
        pair = generate_keypair(out_dir)
    except SigningError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"private key: {pair.private} (mode 0600; writers only: {SIGNING_KEY_ENV}={pair.private})")
    click.echo(f"public key:  {pair.public} (readers: {PUBLIC_KEY_ENV}={pair.public})")
    click.echo(f"key id:      {pair.key_id}")


@cli.command()
@click_option("urza")
@click_option("device")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".esper/report"),
    show_default=True,
    help="folder for report.md, report.html and the plots",
)
def report(urza: Path | None, device: str | None, out_dir: Path) -> None:
    """Render the latest certification evidence in Urza, one section per artifact kind, as a Markdown and a
    self-contained HTML page (the plots need the report extra: pip install 'esper[report]')."""
    from esper.artifacts.compat import current
    from esper.report import ReportError, render
    from esper.urza import UrzaError

    try:
        md, page = render(_settings(urza).urza, out_dir, current(device or "cpu"))
    except (ReportError, UrzaError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {md} and {page}")


@cli.command(name="certify")
@click.argument("names", nargs=-1)
@click_option("urza")
@click_option("blueprints")
@click_option("budget_profile")
@click_option("device")
@click_option("build_dir")
@click_option("baseline")
@click_option("regression")
@click_option("inconclusive")
@click_option("confirm_seconds")
@click_option("recheck")
@click_option("shard")
def certify_cmd(
    names: tuple[str, ...],
    urza: Path | None,
    blueprints: tuple[Path, ...],
    budget_profile: str | None,
    device: str | None,
    build_dir: Path | None,
    baseline: Path | None,
    regression: float,
    inconclusive: Policy,
    confirm_seconds: float,
    recheck: bool,
    shard: Any,
) -> None:
    """Certify blueprints (all by default) as `pytest --certify` does, without pytest: compile, parity, guards,
    latency, select, budgets and publish, with the same options. Exit 1 when a check or the release gate
    fails; a run the gate could not judge passes with a warning, or under `--inconclusive fail` exits 75."""
    from esper.catalog import UnknownBlueprintError
    from esper.certification.extras import INSTALL, missing_library

    missing = missing_library()
    if missing:
        raise click.ClickException(f"esper certify needs {', '.join(missing)} (not installed): {INSTALL}")
    from esper.certification.session import DEFAULT_BUILD_DIR, CertifySession

    settings = _settings(urza, blueprints, budget_profile)
    session = CertifySession(
        settings=settings,
        build_dir=(build_dir or settings.root / DEFAULT_BUILD_DIR).resolve(),
        enabled=True,
        recheck=recheck,
        device=device or "cpu",
        baseline=baseline,
        regression=regression,
        inconclusive=inconclusive,
        confirm_seconds=confirm_seconds,
        shard=shard,
    )
    try:
        session.certify(names)
    except UnknownBlueprintError as e:
        raise click.ClickException(str(e)) from e
    session.finish()
    failures = session.failures()
    for line in failures:
        click.echo(f"FAILED {line}", err=True)
    if session.runs or session.errors:
        path = session.write_summary()
        click.echo(session.summary_table())
        click.echo(f"(summary written to {path})")
    status = session.exit_status()
    for line in session.gate_report():
        click.echo(line)
    if failures or status == 1:
        sys.exit(1)
    if status:
        sys.exit(status)


def main() -> None:
    cli()
