"""Kasmina, the runtime loader: certified artifacts in, kernels out, never a compile.

``Kasmina(urza).load(name)`` gives an inference :class:`Kernel`, ``load_training(name, weights)`` a
:class:`TrainingKernel`; both through one load path (:mod:`esper.kasmina.loader`). Nothing under this package
may import the compiler stack; tests/kasmina/test_static.py enforces it.
"""

from esper.artifacts.tensors import WeightSchemaError
from esper.kasmina.base import COMPILED, EAGER
from esper.kasmina.choose import choose_entries
from esper.kasmina.kernel import Kernel, Route
from esper.kasmina.loader import Kasmina
from esper.kasmina.training_kernel import TrainingKernel
from esper.kasmina.unusable import Unusable

__all__ = [
    "COMPILED",
    "EAGER",
    "Kasmina",
    "Kernel",
    "Route",
    "TrainingKernel",
    "Unusable",
    "WeightSchemaError",
    "choose_entries",
]
