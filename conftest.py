"""What this repository's own pytest runs need beyond the installed ``pytest --certify`` plugin."""

import os

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
