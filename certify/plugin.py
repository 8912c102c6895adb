"""The ``pytest --certify`` plugin (registered through the ``pytest11`` entry point).

This folder installs as ``esper_certify`` (a bare ``certify`` could collide with another distribution's
package in site-packages), so its modules import one another relatively and nothing imports ``certify``.

Every hook is one call on :class:`esper_certify.session.PytestCertify`, kept in ``config.stash``; the checks live
in :mod:`esper.certification` and return results that the generated modules turn into pass, skip or fail.
Nothing here imports torch or the harness's dependency (hypothesis): an ordinary
``pytest`` run pays nothing for the plugin and works without ``esper[certify]`` installed; ``--certify``
without it is a usage error saying what to install.
"""

from __future__ import annotations

from typing import Any

import pytest

from esper.options import OPTIONS, add_pytest_option

from .session import PytestCertify

__all__ = ["SESSION"]

SESSION = pytest.StashKey[PytestCertify]()
PREFIX = "certify-"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("esper-certify", "Esper certification (pytest --certify)")
    group.addoption("--certify", action="store_true", help="generate and run one certification module per blueprint")
    for key in OPTIONS:
        add_pytest_option(group, key, PREFIX)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash.setdefault(SESSION, PytestCertify(config)).configure()


@pytest.fixture(scope="module")
def certification(request: pytest.FixtureRequest) -> Any:
    """The :class:`~esper.certification.run.BlueprintCertification` of the requesting generated module: one
    certification per artifact kind, ``certification["inference"]`` and ``certification["training"]``."""
    return request.config.stash[SESSION].certification(request.module)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[SESSION].collection_finish(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[SESSION].finish(session)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    config.stash[SESSION].summary(terminalreporter)
