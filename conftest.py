"""What this repository's own pytest runs need beyond the installed ``pytest --certify`` plugin."""

import importlib.util
import os

import pytest

pytest_plugins = ["pytester"]

# Blueprint files and generated modules are collected only through --certify or an explicit path.
collect_ignore = ["blueprints"]


def load_test_profile() -> None:
    """Our own property tests: derandomized in CI so a red build reproduces, exploring more locally."""
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "esper-tests-ci",
        derandomize=True,
        deadline=None,
        max_examples=100,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "esper-tests", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("esper-tests-ci" if os.environ.get("CI") else "esper-tests")


def pytest_configure(config: pytest.Config) -> None:
    # A certification run from this folder runs none of our tests, and its parity checks name their own
    # settings: importing Hypothesis here would only add its import to every certification, changed or not.
    if not config.getoption("certify", default=False):
        load_test_profile()
    # pytest-benchmark (the `bench` extra, for benchmarks/) warns about its own settings; its warning class can be
    # named only where it is installed (pyproject's filterwarnings would stop every run without it).
    if importlib.util.find_spec("pytest_benchmark") is not None:
        config.addinivalue_line("filterwarnings", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning")
