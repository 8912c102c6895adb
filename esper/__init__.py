"""Esper's compile pipeline: Tezzeret compiles blueprints ahead of time, Urza stores them, Kasmina loads them.

Importing :mod:`esper` imports nothing heavy; import the stage you need (``esper.kasmina`` at run time).
"""

__version__ = "0.1.0"
