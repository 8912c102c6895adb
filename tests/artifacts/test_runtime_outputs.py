"""A compiled package's outputs reach the caller as separate tensors (esper.artifacts.runtime.separate): one
whose memory overlaps another's is copied, and outputs that share no element are handed over as they are."""

from __future__ import annotations

import torch

from esper.artifacts.runtime import separate


def test_an_output_viewing_another_is_copied() -> None:
    out = torch.randn(2, 5, 3)
    last = out[:, -1].unsqueeze(0)  # a GRU's last hidden state, as compiled code may return it
    got = separate([out, last])
    assert got[0] is out
    assert torch.equal(got[1], last)
    got[0].zero_()  # a caller's write into the sequence must leave the hidden state alone, as in eager
    assert not torch.equal(got[1], torch.zeros_like(got[1]))
    assert got[1].untyped_storage().data_ptr() != out.untyped_storage().data_ptr()


def test_separate_outputs_are_handed_over_as_they_are() -> None:
    a, b, empty = torch.randn(3), torch.randn(4), torch.empty(0)
    got = separate([a, b, empty, torch.empty(0), 7])
    assert got[0] is a and got[1] is b and got[2] is empty and got[4] == 7


def test_the_same_tensor_twice_becomes_two() -> None:
    a = torch.randn(3)
    got = separate([a, a])
    assert got[0] is a and got[1] is not a and torch.equal(got[1], a)


def test_disjoint_parts_of_one_buffer_are_handed_over_as_they_are() -> None:
    y = torch.randn(4, 6)
    top, bottom, left = y[:2], y[2:], y[:, :3]
    got = separate([top, bottom])
    assert got[0] is top and got[1] is bottom  # chunks of one buffer share no element
    got = separate([top, left])  # overlapping rows: the second is copied
    assert got[0] is top and got[1] is not left and torch.equal(got[1], left)
    got[1].zero_()
    assert not torch.equal(top[:, :3], torch.zeros(2, 3))
