"""Option definitions shared by the ``esper`` CLI and the ``pytest --certify`` plugin, so the two never drift.

Each option has one validator that raises a clear error; :func:`click_option` and :func:`add_pytest_option`
turn a definition into the flag each front end needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from esper.certification.budgets import PROFILES
from esper.certification.gate import (
    DEFAULT_CONFIRM_SECONDS,
    DEFAULT_THRESHOLD,
    INCONCLUSIVE_EXIT,
    LOAD_LIMIT,
    Policy,
    policy,
    seconds,
    threshold,
)
from esper.certification.shard import parse_shard


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"blueprint folder {value!r} does not exist")
    return path


def _urza_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder; give the database file (e.g. {value}/urza.db)")
    return path


def _budget_profile(value: str) -> str:
    if value not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown budget profile {value!r} (known: {', '.join(sorted(PROFILES))})")
    return value


def _device(value: str) -> str:
    if value != "cpu" and not value.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"device {value!r} must be 'cpu' or 'cuda[:N]'")
    return value


def _path(value: str) -> Path:
    return Path(value)


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    parse: Callable[[str], Any]
    metavar: str
    multiple: bool = False
    default: Any = None
    flag: bool = False


OPTIONS = {
    "urza": Option(
        "urza",
        "Urza database path (default: $ESPER_URZA, [tool.esper] urza, .esper/urza.db)",
        _urza_path,
        "PATH",
    ),
    "blueprints": Option(
        "blueprints",
        "an extra blueprint folder (repeatable; added to [tool.esper] blueprint-paths)",
        _existing_dir,
        "DIR",
        multiple=True,
    ),
    "budget_profile": Option(
        "budget-profile",
        f"budget profile for this machine class ({', '.join(sorted(PROFILES))})",
        _budget_profile,
        "NAME",
    ),
    "device": Option("device", "device to compile for: cpu or cuda[:N] (default cpu)", _device, "DEVICE"),
    "build_dir": Option(
        "build-dir",
        "where the run's files go: latency.json, the summary and (pytest) the generated modules (default: "
        ".esper/certify in the project)",
        _path,
        "DIR",
    ),
    "baseline": Option(
        "baseline",
        "release gate: fail when a candidate's compiled/eager latency ratio regressed against this stored "
        "latency.json (a previous run's), with confidence",
        _path,
        "FILE",
    ),
    "regression": Option(
        "regression",
        "the slowdown the release gate tolerates (default 20%)",
        threshold,
        "PCT",
        default=DEFAULT_THRESHOLD,
    ),
    "inconclusive": Option(
        "inconclusive",
        "release gate: what a run it cannot judge does (this run's load differs from the baseline's even after "
        f"measuring again): 'pass' with a warning (default), or 'fail' with exit status {INCONCLUSIVE_EXIT}, which CI "
        "can retry on (a regression exits 1)",
        policy,
        "{pass,fail}",
        default=Policy.PASS,
    ),
    "confirm_seconds": Option(
        "confirm-seconds",
        f"release gate: how long to measure again the comparisons whose eager time moved beyond {LOAD_LIMIT}x the "
        f"baseline's, waiting for the load to settle (default {DEFAULT_CONFIRM_SECONDS:g}; 0: judge at once)",
        seconds,
        "SECONDS",
        default=DEFAULT_CONFIRM_SECONDS,
    ),
    "recheck": Option(
        "recheck",
        "run every check again, even for entries already certified with the same content hash",
        bool,
        "",
        flag=True,
    ),
    "shard": Option(
        "shard",
        "certify only shard K of N of the blueprints (round-robin by sorted name), e.g. 1/2 on one machine and "
        "2/2 on another; `esper urza merge` joins their Urzas",
        parse_shard,
        "K/N",
    ),
}


def click_option(key: str) -> Callable[[Any], Any]:
    """The ``--NAME`` click option for ``OPTIONS[key]``."""
    opt = OPTIONS[key]
    if opt.flag:
        return click.option(f"--{opt.name}", key, is_flag=True, help=opt.help)

    def convert(ctx: click.Context | None, param: click.Parameter, value: Any) -> Any:
        try:
            if opt.multiple:
                return tuple(opt.parse(v) for v in value)
            return opt.default if value is None else opt.parse(value)
        except argparse.ArgumentTypeError as e:
            raise click.BadParameter(str(e)) from e

    return click.option(
        f"--{opt.name}", key, help=opt.help, metavar=opt.metavar, multiple=opt.multiple, callback=convert
    )


def add_pytest_option(group: Any, key: str, prefix: str) -> None:
    """Add ``--{prefix}{NAME}`` for ``OPTIONS[key]`` to a pytest option group."""
    opt = OPTIONS[key]
    dest = f"{prefix.replace('-', '_')}{key}"
    if opt.flag:
        group.addoption(f"--{prefix}{opt.name}", dest=dest, action="store_true", help=opt.help)
        return
    group.addoption(
        f"--{prefix}{opt.name}",
        dest=dest,
        type=opt.parse,
        metavar=opt.metavar,
        # pytest's help formatter is argparse's: a literal percent sign must be doubled
        help=opt.help.replace("%", "%%"),
        action="append" if opt.multiple else "store",
        default=[] if opt.multiple else opt.default,
    )
