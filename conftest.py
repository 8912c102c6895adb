"""What this repository's own pytest runs need beyond the installed ``pytest --certify`` plugin."""

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

# Blueprint files and generated modules are collected only through --certify or an explicit path.
collect_ignore = ["blueprints"]

# Our own property tests: derandomized in CI so a red build reproduces, exploring more locally.
settings.register_profile(
    "esper-tests-ci", derandomize=True, deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("esper-tests", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("esper-tests-ci" if os.environ.get("CI") else "esper-tests")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark (the `bench` extra, for benchmarks/) warns about its own settings; its warning class can be
    # named only where it is installed (pyproject's filterwarnings would stop every run without it).
    if importlib.util.find_spec("pytest_benchmark") is not None:
        config.addinivalue_line("filterwarnings", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning")
