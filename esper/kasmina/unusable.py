"""Why a compiled path cannot be used: the one exception every stage of Kasmina's load path raises.

A leaf module, so that choosing, verifying, loading and pre-warming (for every artifact kind) share one
exception type without importing each other. It never escapes ``Kasmina.load*``: the loader turns it into
an eager kernel and a WARNING carrying ``code`` (a stable reason code from :mod:`esper.kasmina.telemetry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Unusable(Exception):
    """Why the compiled path cannot be used: a telemetry reason code and a detail for people.

    A row-level refusal (a row Kasmina will not read or trust: unreadable, unsigned, malformed) carries the
    ``entry_id`` of the refused row and, when the row would have served a shape profile (a certified row),
    that ``profile``: calls in a profile whose row was refused are explained by the refusal, not blamed on
    their inputs."""

    def __init__(self, code: str, detail: str, *, profile: str | None = None, entry_id: int | None = None):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.profile = profile
        self.entry_id = entry_id

    @property
    def row_refused(self) -> bool:
        """Whether this is a refusal of one stored row (the others may still serve)."""
        return self.entry_id is not None


def removed_profiles(problems: Iterable[Unusable], served: Iterable[str]) -> list[Unusable]:
    """The row refusals that took a shape profile away: those of a profile no route in ``served`` covers."""
    covered = set(served)
    return [u for u in problems if u.profile is not None and u.profile not in covered]


def refusal_note(refused: Sequence[Unusable]) -> str | None:
    """What a call outside every route is told about refused profiles (``None`` when none was refused):
    inputs of such a profile run eager because its row was refused, not because of the inputs."""
    if not refused:
        return None
    parts = [f"profile {u.profile!r}: entry #{u.entry_id} refused ({u.code}: {u.detail})" for u in refused]
    return "Urza rows refused, their profiles run eager: " + "; ".join(parts)
