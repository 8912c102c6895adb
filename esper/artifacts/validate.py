"""Parsing stored values into typed, validated ones: the one place a row's contents are trusted from.

Data is data: nothing read from Urza (or any file) becomes code, a Python attribute name or a path before it
has passed through one of these functions. Each returns the value with a precise type (``int``, not ``bool``;
``str`` matching a pattern; a name from a fixed list) or raises :class:`EntryFormatError` naming the column
and the problem. A torch-free leaf: Kasmina, Urza, the guards and signing all use it without importing each
other.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

#: Element types a guard, a blueprint input or a weight schema may name. Fixed: a stored dtype is looked up
#: here, never with ``getattr(torch, name)``.
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
#: Device types an artifact may run on.
DEVICE_TYPES = ("cpu", "cuda")
#: Upper bound for any stored size, range bound or byte count (a sane cap, far above any real tensor dim).
MAX_SIZE = 2**40
#: Upper bound for counts: inputs of a schema, dims of an input, representative shapes, weights.
MAX_COUNT = 4096
#: Upper bound for free text kept in a row (reasons, descriptions).
MAX_TEXT = 65536

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A state-dict name: identifiers (or digits, for ``nn.Sequential``) joined by dots.
# A state-dict key: dotted module path parts, which nn.Sequential and nn.ModuleList name by index ("0.weight").
WEIGHT_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,128}(\.[A-Za-z0-9_]{1,128}){0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PROFILE_PART = r"[A-Za-z_][A-Za-z0-9_]{0,127}=[0-9]{1,13}-[0-9]{1,13}"
_EXACT_PART = r"[A-Za-z_][A-Za-z0-9_]{0,127}=[0-9]{1,13}"
#: ``default``, or ``batch=1-4,seq=1-8`` (see :func:`esper.profiles.profile_name`); either may end in a
#: specialization's exact sizes, ``default@seq=32`` (see :func:`esper.profiles.specialization_name`).
PROFILE_RE = re.compile(
    rf"^(default|{_PROFILE_PART}(,{_PROFILE_PART}){{0,31}})(@{_EXACT_PART}(,{_EXACT_PART}){{0,31}})?$"
)
#: A compile variant or route name (``default``, ``freezing``, ``eager``, ``train``).
VARIANT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: A blueprint name (the same rule as :data:`esper.blueprint.NAME_RE`).
BLUEPRINT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class EntryFormatError(ValueError):
    """A stored value is not what its column must hold: wrong type, out of range, unknown name.

    ``column`` names the column (``"guards"``, ``"meta.representative"``), ``problem`` says what is wrong. The
    offending value is shown with ``repr`` and truncated, so a hostile value is only ever quoted, never used.
    """

    def __init__(self, column: str, problem: str):
        self.column = column
        self.problem = problem
        super().__init__(f"column {column!r}: {problem}")


def quote(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: for messages about hostile values."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises is itself hostile; name the type only
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(value: Any, column: str, what: str, *, lo: int = 0, hi: int = MAX_SIZE) -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (a ``bool``, float or string is refused, not converted)."""
    if type(value) is not int:
        raise EntryFormatError(column, f"{what} is {quote(value)}, not an integer")
    if not lo <= value <= hi:
        raise EntryFormatError(column, f"{what} is {value}, outside [{lo}, {hi}]")
    return value


def boolean(value: Any, column: str, what: str) -> bool:
    """``value`` as a ``bool`` (``0``/``1`` are refused)."""
    if type(value) is not bool:
        raise EntryFormatError(column, f"{what} is {quote(value)}, not true or false")
    return value


def text(value: Any, column: str, what: str, *, limit: int = MAX_TEXT) -> str:
    """``value`` as a ``str`` of at most ``limit`` characters."""
    if type(value) is not str:
        raise EntryFormatError(column, f"{what} is {quote(value)}, not a string")
    if len(value) > limit:
        raise EntryFormatError(column, f"{what} is {len(value)} characters long, more than {limit}")
    return value


def optional_text(value: Any, column: str, what: str, *, limit: int = MAX_TEXT) -> str | None:
    """``None`` or :func:`text`."""
    return None if value is None else text(value, column, what, limit=limit)


def matching(value: Any, pattern: re.Pattern[str], column: str, what: str) -> str:
    """``value`` as a ``str`` matching ``pattern`` in full."""
    if type(value) is not str or not pattern.fullmatch(value):
        raise EntryFormatError(column, f"{what} {quote(value)} does not match {pattern.pattern}")
    return value


def identifier(value: Any, column: str, what: str) -> str:
    """``value`` as a Python identifier of at most 128 characters (ASCII only)."""
    return matching(value, IDENTIFIER_RE, column, what)


def choice(value: Any, choices: Collection[str], column: str, what: str) -> str:
    """``value`` as one of ``choices`` (compared as ``str``, so an enum member's value is accepted)."""
    if not isinstance(value, str) or value not in choices:
        raise EntryFormatError(column, f"{what} {quote(value)} is not one of {tuple(choices)}")
    return str(value)


def mapping(value: Any, column: str, what: str, *, keys: Collection[str] | None = None) -> Mapping[str, Any]:
    """``value`` as a ``dict`` with string keys; with ``keys``, no key outside them."""
    if not isinstance(value, dict):
        raise EntryFormatError(column, f"{what} is {quote(value)}, not an object")
    if len(value) > MAX_COUNT:
        raise EntryFormatError(column, f"{what} has {len(value)} keys, more than {MAX_COUNT}")
    for k in value:
        if type(k) is not str:
            raise EntryFormatError(column, f"{what} has a key {quote(k)} that is not a string")
    if keys is not None:
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise EntryFormatError(column, f"{what} has unknown keys {quote(unknown)} (known: {sorted(keys)})")
    return value


def sequence(value: Any, column: str, what: str, *, limit: int = MAX_COUNT) -> Sequence[Any]:
    """``value`` as a list or tuple (not a string) of at most ``limit`` items."""
    if not isinstance(value, list | tuple):
        raise EntryFormatError(column, f"{what} is {quote(value)}, not a list")
    if len(value) > limit:
        raise EntryFormatError(column, f"{what} has {len(value)} items, more than {limit}")
    return value


def sha256(value: Any, column: str, what: str) -> str:
    """``value`` as 64 lowercase hex digits."""
    return matching(value, SHA256_RE, column, what)
