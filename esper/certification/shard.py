"""One shard of a catalog: ``K/N`` takes every N-th blueprint, by sorted name, starting at the K-th.

A CI matrix runs one certification per shard, each into its own Urza, and ``esper urza merge`` joins them.
The split depends only on the names, so every machine of the matrix computes the same one; round-robin over
the sorted names keeps the shards within one blueprint of each other in size.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Shard", "parse_shard"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: K must be between 1 and N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, items: Iterable[T], key: Callable[[T], str]) -> list[T]:
        """The items of this shard, in their given order; ``key`` names an item (its blueprint name)."""
        items = list(items)
        names = sorted({key(item) for item in items})
        mine = {name for position, name in enumerate(names) if position % self.count == self.index - 1}
        return [item for item in items if key(item) in mine]


def parse_shard(value: str) -> Shard:
    """``K/N`` as a :class:`Shard`; anything else is an :class:`argparse.ArgumentTypeError` saying why."""
    k, sep, n = value.partition("/")
    try:
        if not sep:
            raise ValueError
        return Shard(int(k), int(n))
    except ValueError as e:
        detail = f": {e}" if str(e) else ""
        raise argparse.ArgumentTypeError(f"shard {value!r} must be K/N with 1 <= K <= N (e.g. 1/2){detail}") from e
