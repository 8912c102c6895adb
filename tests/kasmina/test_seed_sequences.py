"""A bound seed in a training loop's hands: any sequence of what a loop does to a seed's module, each call
compared with an eager module built independently from the catalog that went through the same operations.

The session fixture ``compiled_urza`` holds ``tiny_mlp`` certified. Whenever the seed is as the blueprint
declares it (eval mode, not pruned, no autocast, a batch inside the guards), the call must also take the
compiled path: a kernel that answered everything eagerly would pass the comparison and fail this. Inductor
folds ``fc.bias`` into tiny_mlp's code, so only a seed whose bias is the blueprint's counts as declared.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune

from esper.catalog import load_catalog
from esper.kasmina import COMPILED, Kasmina
from tests.support import TINY

pytestmark = pytest.mark.compiles

NAME = "tiny_mlp"
CATALOG = load_catalog([TINY])
GUARD_MAX = 32  # tiny_mlp's batch range is 1-32

OPERATIONS = (
    "call",
    "outside_guards",
    "sgd_step",
    "load_state_dict",
    "assign",
    "column_major",
    "replace_parameter",
    "data_swap",
    "prune",
    "unprune",
    "train",
    "eval",
    "deepcopy",
    "autocast",
    "threads",
)


def oracle(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = CATALOG.get(NAME).build().eval()
    module.load_state_dict({k: v.clone() for k, v in state.items()})
    return module


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_any_sequence_of_seed_operations_matches_eager(compiled_urza: Path, ops: list[str], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    blueprint = CATALOG.get(NAME).build().state_dict()
    start = {**blueprint, "fc.weight": blueprint["fc.weight"] + 0.1 * randn(8, 8)}
    module, want = oracle(start), oracle(start)
    kernel = Kasmina(compiled_urza, blueprint_paths=[TINY]).load_seeds(NAME).bind(module)
    pruned = autocast = False

    def compare(batch: int | None = None) -> None:
        x = randn(batch or int(torch.randint(1, GUARD_MAX + 1, (1,), generator=gen)), 8)
        kept = x.clone()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, expected = kernel(x), want(x)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(x, kept)
        folded = torch.equal(want.fc.bias, blueprint["fc.bias"])
        pristine = folded and not (pruned or autocast or module.training) and x.shape[0] <= GUARD_MAX
        if pristine:
            assert kernel.last_path == COMPILED, kernel.check(x)

    for op in ops:
        if op == "outside_guards":
            compare(GUARD_MAX + 1 + int(torch.randint(0, 8, (1,), generator=gen)))
            continue
        if op == "sgd_step":
            # An optimizer step in place: what the loop's optimizer does to the seed's parameters.
            delta = {n: 0.01 * randn(*p.shape) for n, p in want.named_parameters() if "weight" in n}
            with torch.no_grad():
                for m in (module, want):
                    for n, p in m.named_parameters():
                        if n in delta:
                            p.sub_(delta[n])
        elif op in ("load_state_dict", "assign"):
            new = {k: 0.5 * randn(*v.shape) for k, v in want.state_dict().items()}
            if torch.randint(0, 2, (1,), generator=gen).item():  # half the time, the blueprint's folded bias
                new["fc.bias"] = blueprint["fc.bias"].clone()
            for m in (module, want):
                m.load_state_dict({k: v.clone() for k, v in new.items()}, assign=op == "assign")
        elif op == "column_major" and not pruned:
            w = randn(8, 8)
            module.fc.weight = torch.nn.Parameter(w.t().contiguous().t())
            want.fc.weight = torch.nn.Parameter(w.clone())
        elif op == "replace_parameter":
            b = blueprint["fc.bias"] if torch.randint(0, 2, (1,), generator=gen).item() else randn(8)
            module.fc.bias, want.fc.bias = torch.nn.Parameter(b.clone()), torch.nn.Parameter(b.clone())
        elif op == "data_swap":
            b = randn(8)
            module.fc.bias.data, want.fc.bias.data = b.clone(), b.clone()
        elif op == "prune" and not pruned and module.fc.weight.is_contiguous():  # torch's pruning views the weight
            for m in (module, want):
                prune.l1_unstructured(m.fc, "weight", amount=0.25)
            pruned = True
        elif op == "unprune" and pruned:
            for m in (module, want):
                prune.remove(m.fc, "weight")
            pruned = False
        elif op == "train":
            module.train()
            want.train()
        elif op == "eval":
            module.eval()
            want.eval()
        elif op == "deepcopy":
            # An EMA copy: the copy follows its own weights, and the original is untouched by the copy's steps.
            twin, twin_want = copy.deepcopy(kernel), copy.deepcopy(want)
            with torch.no_grad():
                for m in (twin.seed, twin_want):
                    for n, p in m.named_parameters():
                        if "weight" in n:
                            p.mul_(0.9)
            x = randn(4, 8)
            with torch.no_grad():
                torch.testing.assert_close(twin(x), twin_want(x), atol=1e-5, rtol=1e-5)
            compare()
            kernel, module, want = twin, twin.seed, twin_want
        elif op == "autocast":
            autocast = True
            compare()
            autocast = False
        elif op == "threads":
            errors: list[BaseException] = []

            def call(errors: list[BaseException] = errors) -> None:
                try:
                    for _ in range(5):
                        compare()
                except BaseException as e:  # re-raised in the test's thread
                    errors.append(e)

            workers = [threading.Thread(target=call) for _ in range(3)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if errors:
                raise errors[0]
        compare()
