"""A Kasmina pickles as its constructor arguments, and a kernel's ``source`` loads the same kernel again."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from esper.artifacts.signing import Verifier, generate_keypair
from esper.kasmina import COMPILED, Kasmina
from tests.support import TINY


def test_kasmina_pickles_as_its_arguments(compiled_urza: Path) -> None:
    kasmina = Kasmina(compiled_urza, blueprint_paths=[TINY], min_snapshot_version=None)
    copy = pickle.loads(pickle.dumps(kasmina))
    assert copy.urza_path == kasmina.urza_path
    assert copy.device == kasmina.device
    assert copy.load("tiny_mlp").route == COMPILED
    assert "tiny_mlp" in copy.catalog.blueprints  # read again from the folder


def test_kernel_source_loads_the_same_kernel_again(compiled_urza: Path) -> None:
    kasmina = Kasmina(compiled_urza, blueprint_paths=[TINY])
    for kernel in (kasmina.load("tiny_mlp"), kasmina.load_seeds("tiny_mlp")):
        again = pickle.loads(pickle.dumps(kernel.source))()
        assert type(again) is type(kernel)
        assert again.route == kernel.route == COMPILED
        assert again.entry is not None and kernel.entry is not None
        assert again.entry.id == kernel.entry.id
        x = torch.randn(3, 8)
        torch.testing.assert_close(again(x), kernel(x))
    entry_id = kasmina.load("tiny_mlp").entry.id  # type: ignore[union-attr]
    by_id = pickle.loads(pickle.dumps(kasmina.load_entry("tiny_mlp", entry_id).source))()
    assert by_id.entry.id == entry_id  # type: ignore[union-attr]


def test_a_given_verifier_pickles_as_its_key_material(compiled_urza: Path, tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "keys")
    from_file = Verifier.from_file(pair.public)
    given = Verifier(from_file.public_key, from_file.key_id)  # no file behind it
    copy = pickle.loads(pickle.dumps(Kasmina(compiled_urza, blueprint_paths=[TINY], public_key=given)))
    assert copy.verifier is not None and copy.verifier.key_id == pair.key_id
    by_path = pickle.loads(pickle.dumps(Kasmina(compiled_urza, blueprint_paths=[TINY], public_key=pair.public)))
    assert by_path.verifier is not None and by_path.verifier.path == pair.public


@pytest.mark.parametrize("bad", [{"public_key": ""}, {"min_snapshot_version": "x"}])
def test_an_unusable_setting_stays_unusable_in_a_copy(compiled_urza: Path, bad: dict[str, object]) -> None:
    """A copy of a Kasmina that refuses everything refuses everything too: fail closed across pickling."""
    copy = pickle.loads(pickle.dumps(Kasmina(compiled_urza, blueprint_paths=[TINY], **bad)))  # type: ignore[arg-type]
    assert copy.load("tiny_mlp").route != COMPILED
