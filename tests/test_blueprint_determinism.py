"""Building a blueprint never depends on torch's global RNG: ``seeded`` draws from a private generator of the
building thread, the numbers ``torch.manual_seed`` would give, whatever other threads draw meanwhile."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from esper.blueprint import seeded
from esper.catalog import load_catalog
from esper.kasmina import EAGER, Kasmina
from esper.kasmina.conformance import mode_problem
from esper.numerics.inputs import example_inputs
from tests.support import CATALOG


def draws() -> list[torch.Tensor]:
    """A builder's kinds of random draws: layer initialisation, factories, ``*_like``, in-place samplers."""
    linear = torch.nn.Linear(8, 4)
    x = torch.empty(3, 5)
    return [
        linear.weight,
        linear.bias,
        torch.randn(2, 3),
        torch.rand(4),
        torch.randint(0, 100, (5,)),
        torch.randint(100, (2,)),
        torch.randperm(7),
        torch.rand_like(x),
        torch.randn_like(x),
        torch.randint_like(x, 10),
        x.normal_(),
        torch.bernoulli(torch.full((6,), 0.5)),
        torch.multinomial(torch.ones(5), 3),
        torch.nn.init.trunc_normal_(torch.empty(4, 4)),
    ]


def test_seeded_draws_what_manual_seed_draws() -> None:
    """Today's weights stay bit-identical: the known build is one under ``torch.manual_seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected = draws()
    with seeded(5):
        got = draws()
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_seeded_leaves_the_global_generator_and_no_mode_behind() -> None:
    before = torch.random.get_rng_state()
    with seeded(1):
        torch.randn(10)
        with seeded(2):  # nested: the inner seed's draws, then the outer's resume where they were
            torch.randn(3)
        inner = torch.randn(3)
    with seeded(1):
        torch.randn(10)
        assert torch.equal(inner, torch.randn(3))
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError), seeded(3):
        raise ValueError("a builder that raises")
    assert mode_problem() is None  # compiled calls after a build are not routed eager


@contextmanager
def busy_thread() -> Iterator[None]:
    """Another thread drawing from the global generator in a tight loop, switched to as often as possible."""
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(4)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("name", ["swiglu", "lora_adapter"])
def test_eager_modules_are_the_same_whatever_another_thread_draws(name: str, tmp_path: Path) -> None:
    """Fresh eager kernels (no Urza: every call runs the eager module Kasmina builds on first need), built
    while another thread draws random numbers, answer as the module built on a quiet thread does."""
    bp = load_catalog([CATALOG]).get(name)
    oracle = bp.build().eval()
    args = example_inputs(bp, bp.representative[0])
    with torch.no_grad():
        expected = oracle(*args)
    kernels = []
    with busy_thread():
        for _ in range(12):
            kernel = Kasmina(tmp_path / "none.db", blueprint_paths=[CATALOG]).load(name)
            assert kernel.route == EAGER
            with torch.no_grad():
                kernels.append(kernel(*args))
    wrong = sum(not torch.equal(y, expected) for y in kernels)
    assert wrong == 0, f"{wrong} of {len(kernels)} eager modules built while another thread drew differ"


def test_a_stale_blueprint_runs_its_new_code_with_its_new_weights(tmp_path: Path) -> None:
    """A builder changed without a version bump: the eager route of ``load`` does not load the old entry's
    stored weights into the new code; it answers as the new build does, and as ``load_training`` does."""
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza
    from tests.support import BROKEN

    folder = tmp_path / "bps"
    folder.mkdir()
    source = folder / "not_exportable.py"
    source.write_text((BROKEN / "not_exportable.py").read_text())
    urza_path = tmp_path / "urza.db"
    with Urza(urza_path, signer=None) as urza:
        stored = Tezzeret(urza).compile(load_catalog([folder]).get("not_exportable")).entry
    assert stored.engine == "eager"  # the fallback entry stores the builder's weights as its artifact
    # Another seed, one more character (so no cached bytecode of the old file can stand in for it).
    source.write_text(source.read_text().replace("seeded(0)", "seeded(17)"))
    oracle = load_catalog([folder]).get("not_exportable").build().eval()
    x = torch.rand(4, 8) + 0.1  # a positive sum: the forward's linear branch
    with torch.no_grad():
        expected = oracle(x)
        kasmina = Kasmina(urza_path, blueprint_paths=[folder])
        inference = kasmina.load("not_exportable")(x)
        training = kasmina.load_training("not_exportable").eval()(x)
    assert torch.equal(inference, expected)
    assert torch.equal(training, expected)


def test_a_seeded_build_imports_no_compiler(tmp_path: Path) -> None:
    """Kasmina builds eager modules under ``seeded``: the mode must not pull in torch._dynamo or Inductor."""
    import subprocess

    code = (
        "import sys, torch\n"
        "from esper.blueprint import seeded\n"
        "with seeded(0):\n"
        "    torch.nn.Linear(4, 4); torch.randn(3)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout
