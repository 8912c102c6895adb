"""Seeds: a certified inference kernel bound to each seed's own weights (the session's compiled ``tiny_mlp``).

Which weights Inductor left as package constants (swappable) and which it folded into the code is its
choice; the tests read it from the entry and check both kinds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from esper.artifacts.tensors import WeightSchemaError
from esper.kasmina import COMPILED, EAGER, Kasmina, Kernel
from esper.kasmina.seeds import BoundPackage
from tests.support import TINY

pytestmark = pytest.mark.compiles


def base(urza: Path) -> Kernel:
    return Kasmina(urza, blueprint_paths=[TINY]).load("tiny_mlp")


def builder() -> torch.nn.Module:
    from esper.catalog import load_catalog

    return load_catalog([TINY]).get("tiny_mlp").build()


def constants(kernel: Kernel) -> list[str]:
    (route,) = kernel.routes
    return sorted(route.entry.meta["constants"])


def seed_state(kernel: Kernel, k: int) -> dict[str, torch.Tensor]:
    """The builder's weights with every package constant changed (folded weights keep their value)."""
    g = torch.Generator().manual_seed(k)
    state = builder().state_dict()
    return {n: t + torch.randn(t.shape, generator=g) if n in constants(kernel) else t for n, t in state.items()}


def eager_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = builder()
    module.load_state_dict(state)
    return module.eval()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def test_two_seeds_give_their_own_outputs_through_the_compiled_code(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    states = [seed_state(kernel, 1), seed_state(kernel, 2)]
    seeds = [kernel.bind(s) for s in states]
    x = torch.randn(5, 8)
    with torch.no_grad():
        outs = []
        for _ in range(2):  # alternate, so each call swaps the other seed's weights out
            for seed, state in zip(seeds, states, strict=True):
                y = seed(x)
                assert seed.last_path == COMPILED
                torch.testing.assert_close(y, eager_with(state)(x), atol=1e-5, rtol=1e-5)
                outs.append(y)
        assert (outs[0] - outs[1]).abs().max() > 1e-2
        # The base kernel's own package was never touched: it still runs the builder's weights.
        torch.testing.assert_close(kernel(x), builder().eval()(x), atol=1e-5, rtol=1e-5)
        assert kernel.last_path == COMPILED


def test_seeds_share_one_loaded_package_and_own_their_weights(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    state = seed_state(kernel, 3)
    a, b = kernel.bind(state), kernel.bind(seed_state(kernel, 4))
    (ra,), (rb,) = a.routes, b.routes
    assert isinstance(ra.package, BoundPackage) and isinstance(rb.package, BoundPackage)
    assert ra.package._package is rb.package._package is not kernel.routes[0].package
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = a(x)
        for t in state.values():
            t.zero_()  # the caller's dict was copied: the seed holds its own weights
        torch.testing.assert_close(a(x), before)


def test_a_seed_module_trained_in_place_is_seen_without_rebinding(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    module = eager_with(seed_state(kernel, 5))
    seed = kernel.bind(module)
    x = torch.randn(4, 8)
    name = constants(kernel)[0]
    with torch.no_grad():
        seed(x)
        module.get_parameter(name).mul_(0.5)  # what an optimizer step does: in place
        torch.testing.assert_close(seed(x), module(x), atol=1e-5, rtol=1e-5)
    assert seed.last_path == COMPILED


def test_a_folded_weight_that_differs_runs_eager_with_a_warning(
    compiled_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = base(compiled_urza)
    (route,) = kernel.routes
    state = builder().state_dict()
    folded = route.entry.meta.get("folded_constants")
    if folded is None:
        folded = [n for n, t in state.items() if n not in constants(kernel) and t.is_floating_point()]
    if not folded:
        pytest.skip("Inductor kept every weight of this artifact as a constant: nothing is folded")
    name = folded[0]
    changed = {**state, name: state[name] + 1.0}
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"), torch.no_grad():
        seed = kernel.bind(changed)
        torch.testing.assert_close(seed(x), eager_with(changed)(x))
        torch.testing.assert_close(seed(x), eager_with(changed)(x))
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "unbindable" and repr(name) in record.esper["detail"]
    assert seed.last_path == EAGER


def test_a_weight_schema_mismatch_is_an_error_naming_the_tensor(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    good = builder().state_dict()
    cases = [
        ({**good, "fc.weight": torch.zeros(8, 9)}, r"'fc\.weight' is float32\[8, 9\]; .* expects float32\[8, 8\]"),
        ({**good, "fc.weight": good["fc.weight"].half()}, r"'fc\.weight' is float16\[8, 8\]"),
        ({k: v for k, v in good.items() if k != "fc.bias"}, r"lack 'fc\.bias' \(float32\[8\]\)"),
        ({**good, "fc2.weight": torch.zeros(8, 8)}, r"'fc2\.weight' is not a weight of blueprint 'tiny_mlp'"),
    ]
    for state, pattern in cases:
        with pytest.raises(WeightSchemaError, match=pattern):
            kernel.bind(state)
    with pytest.raises(WeightSchemaError, match=r"nn\.Module or a state dict"):
        kernel.bind([torch.zeros(1)])


def test_binding_a_bound_kernel_binds_the_blueprint_not_the_first_seed(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    first_state = seed_state(kernel, 6)
    first = kernel.bind(first_state)
    second = first.bind(seed_state(kernel, 7))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(first(x), eager_with(first_state)(x), atol=1e-5, rtol=1e-5)
        assert second.eager_module() is not first.eager_module()


def test_a_bound_seed_outside_the_guards_runs_its_own_eager_module(compiled_urza: Path) -> None:
    kernel = base(compiled_urza)
    state = seed_state(kernel, 8)
    seed = kernel.bind(state)
    x = torch.randn(40, 8)  # batch range is 1..32
    with torch.no_grad():
        torch.testing.assert_close(seed(x), eager_with(state)(x))
    assert seed.last_path == EAGER


def test_seeds_route_to_swappable_code_where_a_folding_variant_won() -> None:
    from esper.artifacts.compat import current
    from esper.artifacts.guards import GuardSchema
    from esper.kasmina.choose import choose_entries, choose_seed_entries
    from esper.urza import Entry

    key = current()

    def entry(id_: int, variant: str, status: str, failed: str | None = None, swappable: bool = True) -> Entry:
        return Entry(
            blueprint="b",
            blueprint_version=1,
            content_hash="h",
            compat=key,
            engine="aoti",
            status=status,
            checksum="",
            artifact_size=0,
            guards=GuardSchema(inputs=()),
            variant=variant,
            meta={"profiles": ["default"], "swappable": swappable},
            failed_check=failed,
            id=id_,
        )

    frozen = entry(3, "freezing", "certified", swappable=False)
    slower = entry(2, "default", "rejected", "selection")
    broken = entry(1, "default", "rejected", "parity")
    assert [e.id for e in choose_entries([frozen, slower, broken], key)] == [3]
    assert [e.id for e in choose_seed_entries([frozen, slower, broken], key)] == [2]
    # A candidate that failed a check never routes, not even for seeds.
    assert [e.id for e in choose_seed_entries([frozen, broken], key)] == [3]


def test_load_seeds_routes_like_load_when_the_winner_is_swappable(compiled_urza: Path) -> None:
    seeds = Kasmina(compiled_urza, blueprint_paths=[TINY]).load_seeds("tiny_mlp")
    assert [r.entry.id for r in seeds.routes] == [r.entry.id for r in base(compiled_urza).routes]
