"""Seeds of an inference artifact whose package reads a non-persistent buffer (a position table, as
transformers' Llama layers hold): the row records it among the package's constants, and a seed's own buffer
is handed to the compiled code beside its weights.

One compile: ``tests/fixtures/positions/tiny_positions.py`` into a module-scoped temporary Urza, marked
certified as the session fixtures do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.catalog import load_catalog
from esper.kasmina import COMPILED, Kasmina, Kernel
from esper.urza import Urza
from tests.support import FIXTURES

pytestmark = pytest.mark.compiles

POSITIONS = FIXTURES / "positions"
CATALOG = load_catalog([POSITIONS])
NAME = "tiny_positions"


@pytest.fixture(scope="module")
def positions_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> Path:
    from esper.tezzeret.compiler import Tezzeret

    path = tmp_path_factory.mktemp("positions-urza") / "urza.db"
    with Urza(path) as urza:
        entry = Tezzeret(urza).compile(CATALOG.get(NAME)).entry
        assert entry.engine == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    return path


def load(urza: Path) -> Kernel:
    return Kasmina(urza, blueprint_paths=[POSITIONS]).load(NAME)


def perturbed(kernel: Kernel, seed: int) -> dict[str, torch.Tensor]:
    """The builder's weights with every package constant moved (Inductor may fold others: they keep their value)."""
    (route,) = kernel.routes
    taken = route.entry.meta["constants"]
    g = torch.Generator().manual_seed(seed)
    state = CATALOG.get(NAME).build().state_dict()
    return {k: v + 0.5 * torch.randn(v.shape, generator=g) if k in taken else v for k, v in state.items()}


def test_the_row_records_the_nonpersistent_constant_the_package_reads(positions_urza: Path) -> None:
    kernel = load(positions_urza)
    (route,) = kernel.routes
    assert "positions" not in CATALOG.get(NAME).build().state_dict()
    assert set(route.package.constant_names()) == set(route.entry.meta["constants"])  # type: ignore[union-attr]
    assert route.entry.meta["constants"]["positions"] == {"shape": [32], "dtype": "int64"}


def test_a_seed_runs_the_compiled_code_with_its_own_weights(
    positions_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = load(positions_urza)
    state = perturbed(kernel, 1)
    assert any(not torch.equal(t, CATALOG.get(NAME).build().state_dict()[n]) for n, t in state.items())
    eager = CATALOG.get(NAME).build().eval()
    eager.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        seed = kernel.bind(state)
        with torch.no_grad():
            for batch in (1, 5, 32):
                x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
                got = seed(x)
                assert seed.last_path == COMPILED, seed.reason
                torch.testing.assert_close(got, eager(x), atol=1e-5, rtol=1e-5)
                # Not the builder's weights: the seed's own reached the compiled code.
                assert not torch.allclose(got, kernel(x), atol=1e-3)
    assert not [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno >= logging.WARNING]
