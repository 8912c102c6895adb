"""The plugin's state for one pytest run: the library's :class:`~esper.certification.session.CertifySession`,
built from the ``--certify-*`` options, and what pytest tells it (the collected compiles, the end of the run).
Every hook of :mod:`esper_certify.plugin` is one call on this object, kept in ``config.stash``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from esper.certification.extras import missing_library, usage_error

if TYPE_CHECKING:
    from esper.certification.run import BlueprintCertification
    from esper.certification.session import CertifySession

__all__ = ["PytestCertify"]

# xdist schedules that may split one module's tests across workers (its checks share one process's state).
SPLITTING_SCHEDULES = ("load", "worksteal", "loadgroup")


class PytestCertify:
    """One pytest run's certification. The library session is built on first use: by ``--certify`` at
    configure time, or by the first generated module run directly."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._session: CertifySession | None = None

    @property
    def started(self) -> CertifySession | None:
        """The library session, if anything has used it."""
        return self._session

    @property
    def session(self) -> CertifySession:
        if self._session is None:
            self._session = self._build()
        return self._session

    def _build(self) -> CertifySession:
        from esper.certification.session import DEFAULT_BUILD_DIR, CertifySession
        from esper.settings import SettingsError, resolve

        option = self.config.getoption
        try:
            settings = resolve(
                urza=option("certify_urza"),
                blueprint_paths=option("certify_blueprints"),
                budget_profile=option("certify_budget_profile"),
                root=self.config.rootpath,
            )
        except SettingsError as e:
            raise pytest.UsageError(str(e)) from e
        build_dir = option("certify_build_dir") or settings.root / DEFAULT_BUILD_DIR
        return CertifySession(
            settings=settings,
            build_dir=Path(build_dir).resolve(),
            enabled=option("certify"),
            # Running a generated module directly means "run these checks": only a --certify run skips
            # entries certified already with the same content hash.
            recheck=option("certify_recheck") or not option("certify"),
            device=option("certify_device") or "cpu",
            baseline=option("certify_baseline"),
            regression=option("certify_regression"),
            inconclusive=option("certify_inconclusive"),
            confirm_seconds=option("certify_confirm_seconds"),
            shard=option("certify_shard"),
        )

    def configure(self) -> None:
        """With ``--certify``: refuse a missing harness or a bad worker count, generate the modules (see
        :func:`esper_certify.generate.generate`) and run them (alone, unless paths were given)."""
        config = self.config
        config.addinivalue_line("markers", "esper_certify(name): a generated certification test of blueprint NAME")
        if not config.getoption("certify"):
            return
        missing = missing_library()
        if missing:
            raise pytest.UsageError(usage_error(missing))
        from esper.certification.compile_ahead import workers

        from .generate import generate

        try:
            workers()  # a bad ESPER_CERTIFY_COMPILE_WORKERS is the user's, refused before anything runs
        except ValueError as e:
            raise pytest.UsageError(str(e)) from e
        generate(self.session)
        self._one_worker_per_module()
        build_dir = str(self.session.build_dir)
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            config.args[:] = [build_dir]
        elif build_dir not in config.args:
            config.args.append(build_dir)

    def _one_worker_per_module(self) -> None:
        """Under pytest-xdist, send each generated module (one blueprint's checks, in order) to one worker."""
        option = self.config.option
        if getattr(option, "numprocesses", None) and getattr(option, "dist", "no") in SPLITTING_SCHEDULES:
            option.dist = "loadfile"

    def certification(self, module: Any) -> BlueprintCertification:
        """The certification of the blueprint a generated ``module`` checks."""
        return self.session.certification(module.BLUEPRINT, module.SOURCE)

    def collection_finish(self, items: list[pytest.Item]) -> None:
        """Plan the compile workers from the ``test_compile`` items left after ``-k``/``-m`` deselection."""
        if self._session is None:
            return
        compiles: dict[str, list[tuple[str, str]]] = {}
        sources: dict[str, str] = {}
        for item in items:
            module = getattr(item, "module", None)
            name = getattr(module, "BLUEPRINT", None)
            params = getattr(getattr(item, "callspec", None), "params", {})
            if (
                module is not None
                and name
                and getattr(item, "originalname", None) == "test_compile"
                and {"artifact", "candidate"} <= set(params)
            ):
                compiles.setdefault(name, []).append((params["artifact"], params["candidate"]))
                sources[name] = module.SOURCE
        self._session.plan_compiles(compiles, sources)

    def finish(self, session: pytest.Session) -> None:
        """Stop the compile workers, write the latency record, and fail the run when the release gate fails:
        exit 1 for a regression; for a run the gate could not judge under ``--certify-inconclusive=fail``, its
        own status (:data:`~esper.certification.gate.INCONCLUSIVE_EXIT`) unless the run failed otherwise."""
        if self._session is None:
            return
        self._session.close()
        self._session.finish()
        status = self._session.exit_status()
        if status == pytest.ExitCode.TESTS_FAILED:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        elif status and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = status

    def summary(self, terminalreporter: Any) -> None:
        """The certification summary table, where the summary files went, and the release gate's lines."""
        session = self._session
        if session is None or not (session.runs or session.errors):
            return
        path = session.write_summary()
        terminalreporter.section("Esper certification")
        terminalreporter.write_line(session.summary_table())
        terminalreporter.write_line(f"(summary written to {path})")
        undecided = session.verdict is not None and session.verdict.outcome == "inconclusive"
        for line in session.gate_report():
            terminalreporter.write_line(line, yellow=undecided and "INCONCLUSIVE" in line)
