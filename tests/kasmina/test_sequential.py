"""Blueprints whose state-dict keys start with an index (``nn.Sequential``, ``nn.ModuleList``): Urza stores
their weight names and Kasmina serves them compiled, for the blueprint's weights and a seed's."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.artifacts.validate import WEIGHT_NAME_RE
from esper.catalog import load_catalog
from esper.kasmina import COMPILED, Kasmina
from esper.tezzeret.compiler import Tezzeret
from esper.urza import Urza
from tests.support import FIXTURES

SEQUENTIAL = FIXTURES / "sequential"


@pytest.mark.parametrize("name", ["0.weight", "layers.3.bias", "fc.weight", "_private.0"])
def test_state_dict_keys_are_weight_names(name: str) -> None:
    assert WEIGHT_NAME_RE.fullmatch(name)


@pytest.mark.parametrize("name", ["", "0..weight", ".weight", "fc.", "fc weight", "fc/../x", "a\n"])
def test_what_is_no_state_dict_key_is_refused(name: str) -> None:
    assert not WEIGHT_NAME_RE.fullmatch(name)  # validate.matching matches in full


@pytest.mark.compiles
def test_a_sequential_blueprint_is_served_compiled_with_its_own_and_a_seeds_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bp = load_catalog([SEQUENTIAL]).get("tiny_sequential")
    urza_path = tmp_path / "urza.db"
    with Urza(urza_path) as urza:
        entry = Tezzeret(urza).compile(bp).entry
        assert entry.engine == "aoti", entry.failure_reason
        urza.update(entry.id, status="certified")  # type: ignore[arg-type]
    kasmina = Kasmina(urza_path, blueprint_paths=[SEQUENTIAL])
    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"), torch.no_grad():
        kernel = kasmina.load("tiny_sequential")
        assert torch.allclose(kernel(x), bp.build()(x), atol=1e-5)
        assert kernel.last_path == COMPILED
        seed = bp.build()
        # The matrices only: Inductor may fold a bias into the code, and a seed whose folded weight differs
        # runs eager by design (tests of seeds cover that path).
        for p in seed.parameters():
            if p.dim() == 2:
                p.mul_(1.5)
        bound = kasmina.load_seeds("tiny_sequential").bind(seed)
        assert torch.allclose(bound(x), seed(x), atol=1e-5)
        assert bound.last_path == COMPILED
    warned = [r.getMessage() for r in caplog.records if r.name == "esper.kasmina" and r.levelno >= logging.WARNING]
    assert not warned
