"""Why a compiled path cannot be used: the one exception every stage of Kasmina's load path raises.

A leaf module, so that choosing, verifying, loading and pre-warming (for every artifact kind) share one
exception type without importing each other. It never escapes ``Kasmina.load*``: the loader turns it into
an eager kernel and a WARNING carrying ``code`` (a stable reason code from :mod:`esper.kasmina.telemetry`).
"""

from __future__ import annotations


class Unusable(Exception):
    """Why the compiled path cannot be used: a telemetry reason code and a detail for people."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail
