"""The pytest plugin in a project that has pytest but neither the certify extra (hypothesis) nor the bench extra
(pytest-benchmark): it registers, a plain run passes without importing torch, and ``--certify`` says what to install.

Each run is a subprocess whose interpreter first installs a meta-path finder that makes the extra's packages
look uninstalled (their pytest plugins are left out with ``-p no:`` as an uninstalled package's would be).
"""

from __future__ import annotations

import sys

import pytest

from esper.certification.extras import INSTALL, usage_error

HARNESS_PLUGINS = ("-p", "no:benchmark", "-p", "no:hypothesispytest", "-p", "no:cacheprovider")

WITHOUT_HARNESS = """
import sys


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("hypothesis", "pytest_benchmark", "_hypothesis_pytestplugin"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import pytest

sys.exit(pytest.main(sys.argv[1:]))
"""

# Written by the project's own test: what the plugin (and pytest) imported in that process.
LIGHT_TEST = """
import sys

HEAVY = ("torch", "hypothesis", "pytest_benchmark", "esper.certification.session", "esper.certification.run")


def test_nothing_heavy_was_imported():
    assert "esper_certify.plugin" in sys.modules  # the plugin is registered ...
    assert [m for m in sys.modules if m.startswith(HEAVY)] == []  # ... and imports none of these
"""


def run_without_harness(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.run(sys.executable, "-c", WITHOUT_HARNESS, *HARNESS_PLUGINS, *args)


def test_a_plain_run_passes_without_the_harness(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_light=LIGHT_TEST)
    result = run_without_harness(pytester)
    assert result.ret == 0, result.outlines[-20:] + result.errlines[-20:]
    result.stdout.fnmatch_lines(["*1 passed*"])


def test_the_plugin_registers_without_the_harness(pytester: pytest.Pytester) -> None:
    result = run_without_harness(pytester, "--help")
    assert result.ret == 0, result.errlines[-20:]
    result.stdout.fnmatch_lines(["*Esper certification*", "*--certify *generate and run one certification module*"])


def test_certify_without_the_harness_says_what_to_install(pytester: pytest.Pytester) -> None:
    result = run_without_harness(pytester, "--certify")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = [line for line in result.errlines if line.startswith("ERROR:")]
    assert line.startswith("ERROR: pytest --certify needs hypothesis,") and line.endswith(INSTALL)
    assert "pytest-benchmark" not in line
    assert "Traceback" not in result.stderr.str()


def test_a_plain_run_with_the_harness_does_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_light=LIGHT_TEST.replace('"hypothesis", "pytest_benchmark", ', "").replace(
            "# ... and imports none of these", "# ... and imports neither torch nor the certification"
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0, result.outlines[-20:]


def test_the_usage_error_names_what_is_missing_and_what_to_install() -> None:
    assert usage_error(["hypothesis"]) == (
        "pytest --certify needs hypothesis, the certification harness's dependencies: pip install 'esper[certify]'"
    )
