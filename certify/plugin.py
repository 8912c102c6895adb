"""The ``pytest --certify`` plugin (registered through the ``pytest11`` entry point).

Every hook is a line or two that delegates to :class:`esper.certification.session.CertifySession`, kept in
``config.stash``. Nothing here imports torch or the harness's dependencies (hypothesis, pytest-benchmark):
an ordinary ``pytest`` run pays nothing for the plugin and works without ``esper[certify]`` installed;
``--certify`` without it is a usage error saying what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from esper.certification.extras import missing_harness, usage_error
from esper.certification.gate import DEFAULT_THRESHOLD
from esper.certification.gate import threshold as regression_threshold
from esper.options import add_pytest_option

if TYPE_CHECKING:
    from esper.certification.session import CertifySession

SESSION = pytest.StashKey["CertifySession"]()
PREFIX = "certify-"
DEFAULT_BUILD_DIR = Path(".esper") / "certify"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("esper-certify", "Esper certification (pytest --certify)")
    group.addoption("--certify", action="store_true", help="generate and run one certification module per blueprint")
    for key in ("urza", "blueprints", "budget_profile", "device"):
        add_pytest_option(group, key, PREFIX)
    group.addoption(
        "--certify-build-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"where generated modules and the summary go (default: {DEFAULT_BUILD_DIR} in the project)",
    )
    group.addoption(
        "--certify-baseline",
        metavar="FILE",
        type=Path,
        default=None,
        help="release gate: fail when a candidate's compiled/eager latency ratio regressed against this stored "
        "latency.json (a previous run's), with confidence",
    )
    group.addoption(
        "--certify-regression",
        metavar="PCT",
        type=regression_threshold,
        default=DEFAULT_THRESHOLD,
        help="the slowdown the release gate tolerates (default 20%%)",
    )
    group.addoption(
        "--certify-recheck",
        action="store_true",
        help="run every check again, even for entries already certified with the same content hash",
    )


def _session(config: pytest.Config) -> CertifySession:
    if SESSION not in config.stash:
        from esper.certification.session import CertifySession
        from esper.settings import SettingsError, resolve

        try:
            settings = resolve(
                urza=config.getoption("certify_urza"),
                blueprint_paths=config.getoption("certify_blueprints"),
                budget_profile=config.getoption("certify_budget_profile"),
                root=config.rootpath,
            )
        except SettingsError as e:
            raise pytest.UsageError(str(e)) from e
        build_dir = config.getoption("certify_build_dir") or settings.root / DEFAULT_BUILD_DIR
        config.stash[SESSION] = CertifySession(
            settings=settings,
            build_dir=Path(build_dir).resolve(),
            enabled=config.getoption("certify"),
            # Running a generated module directly means "run these checks": only a --certify run skips
            # entries certified already with the same content hash.
            recheck=config.getoption("certify_recheck") or not config.getoption("certify"),
            device=config.getoption("certify_device") or "cpu",
            baseline=config.getoption("certify_baseline"),
            regression=config.getoption("certify_regression"),
        )
    return config.stash[SESSION]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "esper_certify(name): a generated certification test of blueprint NAME")
    if not config.getoption("certify"):
        return
    missing = missing_harness(config.pluginmanager.hasplugin)
    if missing:
        raise pytest.UsageError(usage_error(missing))
    from esper.certification.compile_ahead import workers

    try:
        workers()  # a bad ESPER_CERTIFY_COMPILE_WORKERS is the user's, refused before anything runs
    except ValueError as e:
        raise pytest.UsageError(str(e)) from e
    session = _session(config)
    session.generate()
    _one_worker_per_module(config)
    # Without explicit paths, a certify run runs the certification modules only.
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(session.build_dir)]
    elif str(session.build_dir) not in config.args:
        config.args.append(str(session.build_dir))


# xdist schedules that may split one module's tests across workers (its checks share one process's state).
SPLITTING_SCHEDULES = ("load", "worksteal", "loadgroup")


def _one_worker_per_module(config: pytest.Config) -> None:
    """Under pytest-xdist, send each generated module (one blueprint's checks, in order) to a single worker."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") in SPLITTING_SCHEDULES:
        config.option.dist = "loadfile"


@pytest.fixture(scope="module")
def certification(request: pytest.FixtureRequest) -> Any:
    """The :class:`~esper.certification.run.BlueprintCertification` of the requesting generated module: one
    certification per artifact kind, ``certification["inference"]`` and ``certification["training"]``."""
    return _session(request.config).certification(request.module.BLUEPRINT, request.module.SOURCE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    name = getattr(getattr(item, "module", None), "BLUEPRINT", None)
    if name and SESSION in item.config.stash and (report.when == "call" or not report.passed):
        item.config.stash[SESSION].record_test(
            name,
            getattr(item, "originalname", item.name),
            getattr(getattr(item, "callspec", None), "params", {}),
            report.outcome,
            call.excinfo.exconly() if call.excinfo else report.longreprtext,
        )
    return report


def pytest_collection_finish(session: pytest.Session) -> None:
    certify = session.config.stash.get(SESSION, None)
    if certify is None:
        return
    compiles: dict[str, list[tuple[str, str]]] = {}
    for item in session.items:  # after -k/-m deselection: only what will run
        name = getattr(getattr(item, "module", None), "BLUEPRINT", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if name and getattr(item, "originalname", None) == "test_compile" and {"artifact", "candidate"} <= set(params):
            compiles.setdefault(name, []).append((params["artifact"], params["candidate"]))
    certify.plan_compiles(compiles)


def pytest_sessionfinish(session: pytest.Session) -> None:
    certify = session.config.stash.get(SESSION, None)
    if certify is None:
        return
    certify.close()
    if certify.finish():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash.get(SESSION, None)
    if session is None or not (session.runs or session.errors):
        return
    path = session.write_summary()
    terminalreporter.section("Esper certification")
    terminalreporter.write_line(session.summary_table())
    terminalreporter.write_line(f"(summary written to {path})")
    for line in session.gate_report():
        terminalreporter.write_line(line)
