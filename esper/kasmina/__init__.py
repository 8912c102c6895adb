"""Kasmina, the runtime loader: certified artifacts in, kernels out, never a compile.

Nothing under this package may import the compiler stack; tests/test_kasmina_static.py enforces it.
"""

from esper.kasmina.kernel import COMPILED, EAGER, Kernel, Route
from esper.kasmina.loader import Kasmina, choose_entries

__all__ = ["COMPILED", "EAGER", "Kasmina", "Kernel", "Route", "choose_entries"]
