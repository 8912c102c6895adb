"""A seed of an ``nn.GRU``/``nn.LSTM`` blueprint keeps the blueprint's form: the lists of its own parameters
``nn.RNNBase`` keeps (``_flat_weights`` and weak references to them) name the same weights whatever their
values, and a seed of another form is still refused."""

from __future__ import annotations

import pytest
import torch

from esper.kasmina.conformance import SeedForm


def rnn(cls: type[torch.nn.RNNBase], seed: int, hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(8, hidden, batch_first=True).eval()


@pytest.mark.parametrize("cls", [torch.nn.GRU, torch.nn.LSTM])
def test_a_seed_with_its_own_weights_keeps_the_form(cls: type[torch.nn.RNNBase]) -> None:
    form = SeedForm.of(rnn(cls, 0))
    seed = rnn(cls, 1)
    assert not torch.equal(seed.weight_ih_l0, rnn(cls, 0).weight_ih_l0)  # other values, the same weights
    assert form.problem(seed) is None


@pytest.mark.parametrize("cls", [torch.nn.GRU, torch.nn.LSTM])
def test_a_seed_of_another_form_is_refused(cls: type[torch.nn.RNNBase]) -> None:
    form = SeedForm.of(rnn(cls, 0))
    assert "hidden_size" in str(form.problem(rnn(cls, 0, hidden=4)))
    swapped = rnn(cls, 1)
    # The flat weight list naming other parameters than the blueprint's (its first two swapped).
    flat = swapped._flat_weights
    swapped._flat_weights = [flat[1], flat[0], *flat[2:]]
    assert "_flat_weights" in str(form.problem(swapped))
    foreign = rnn(cls, 1)
    foreign._flat_weights = [torch.nn.Parameter(w.detach().clone()) for w in foreign._flat_weights]  # not its own
    assert "_flat_weights" in str(form.problem(foreign))
