"""Kasmina in training: compiled forward and backward through autograd, each seed with its own weights.

The session fixture ``training_urza`` compiles two training artifacts (the catalog's ``lora_adapter`` and
``tiny_bn``) and stores ``tiny_dropout``'s eager training route; everything here loads them as a training
run would.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esper.artifacts.kinds import ArtifactKind
from esper.artifacts.tensors import WeightSchemaError
from esper.artifacts.training_manifest import TrainingManifest
from esper.kasmina import Kasmina
from esper.kasmina.training_kernel import COMPILED, EAGER
from esper.numerics.gradients import gradients
from esper.urza import Urza
from tests.support import CATALOG, TRAINING, perturbed, training_catalog
from tests.support import build_training as build
from tests.support import kasmina_warnings as warnings_of
from tests.support import load_training as load

pytestmark = pytest.mark.compiles

CATALOG_TRAINING = training_catalog()


def test_fresh_process_trains_a_catalog_seed_like_eager_without_the_compiler(training_urza: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, torch
        from torch.nn import functional as F
        from esper.catalog import load_catalog
        from esper.kasmina import Kasmina

        kernel = Kasmina({str(training_urza)!r}, blueprint_paths=[{str(CATALOG)!r}]).load_training("lora_adapter")
        eager = load_catalog([{str(CATALOG)!r}]).get("lora_adapter").build().train()
        runs = {{"compiled": (kernel, []), "eager": (eager, [])}}

        def sgd_step(module, lr=0.05):
            # Plain SGD by hand: constructing a torch.optim optimizer imports torch._dynamo itself (torch 2.13).
            with torch.no_grad():
                for p in module.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
                        p.grad = None

        gen = torch.Generator().manual_seed(0)
        paths = []
        for step in range(20):
            x, y = torch.randn(16, 256, generator=gen), torch.randn(16, 256, generator=gen)
            for module, curve in runs.values():
                loss = F.mse_loss(module(x), y)
                loss.backward()
                sgd_step(module)
                curve.append(loss.item())
            paths.append(kernel.last_path)
        drift = max(float((a - b).abs().max()) for a, b in zip(kernel.seed.state_dict().values(),
                                                              eager.state_dict().values()))
        # Two more seeds of the blueprint, each with its own weights.
        build = load_catalog([{str(CATALOG)!r}]).get("lora_adapter").build
        seeds = []
        for k in (1, 2):
            module = build().train()
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
            seeds.append((kernel.bind({{n: t.clone() for n, t in module.state_dict().items()}}), module))
        x = torch.randn(5, 256, generator=gen)
        outs = [(s(x), m(x), s.last_path) for s, m in seeds]
        print(json.dumps({{
            "compiled": runs["compiled"][1], "eager": runs["eager"][1], "paths": sorted(set(paths)),
            "weight_drift": drift,
            "seed_errors": [float((a - b).abs().max()) for a, b, _ in outs],
            "seed_paths": [p for _, _, p in outs],
            "seeds_differ": float((outs[0][0] - outs[1][0]).abs().max()),
            "compiler_modules": sorted(m for m in sys.modules
                                       if m.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"])),
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["paths"] == [COMPILED]
    torch.testing.assert_close(torch.tensor(r["compiled"]), torch.tensor(r["eager"]), atol=1e-5, rtol=1e-5)
    assert r["compiled"][-1] < r["compiled"][0], "the loss should fall over 20 SGD steps"
    assert r["weight_drift"] < 1e-5
    assert r["seed_paths"] == [COMPILED, COMPILED]
    assert max(r["seed_errors"]) < 1e-4 and r["seeds_differ"] > 1e-2
    assert r["compiler_modules"] == []


def test_batchnorm_running_statistics_follow_eager_over_training_steps(training_urza: Path) -> None:
    kernel = load(training_urza, "tiny_bn")
    eager = build("tiny_bn").train()
    opt_c = torch.optim.SGD(kernel.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for batch in (3, 17, 32, 2, 9):
        x = torch.randn(batch, 8, generator=gen) * 2 + 1
        for module, opt in ((kernel, opt_c), (eager, opt_e)):
            loss = module(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert kernel.last_path == COMPILED
    with torch.no_grad():  # train mode without autograd still updates the statistics
        x = torch.randn(6, 8, generator=gen)
        kernel(x), eager(x)
    assert kernel.calls[COMPILED] == 6
    for name in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(kernel.seed.get_buffer(name), eager.get_buffer(name), atol=1e-6, rtol=1e-5)
    assert int(kernel.seed.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 6
    for name, p in eager.named_parameters():
        torch.testing.assert_close(kernel.seed.get_parameter(name), p, atol=1e-6, rtol=1e-5)
    kernel.eval()
    eager.eval()
    with torch.no_grad():
        x = torch.randn(4, 8)
        torch.testing.assert_close(kernel(x), eager(x), atol=1e-5, rtol=1e-5)


def test_guards_in_training_mode_send_refused_inputs_to_eager(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = load(training_urza, "lora_adapter")
    eager = build("lora_adapter").train()
    outside = torch.randn(65, 256)  # batch range is 1..64
    assert "outside guard range [1, 64]" in (kernel.check(outside) or "")
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        got_out, got = gradients(kernel, (outside,), weights=kernel.seed)
        gradients(kernel, (outside,), weights=kernel.seed)
        gradients(kernel, (torch.randn(70, 256),), weights=kernel.seed)  # another size, the same kind of refusal
        with pytest.raises(RuntimeError):  # eager itself refuses float64 inputs to float32 weights
            kernel(torch.randn(4, 256, dtype=torch.float64))
    assert kernel.last_path == EAGER and kernel.calls == {EAGER: 4}
    want_out, want = gradients(eager, (outside,))
    torch.testing.assert_close(got_out, want_out)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    details = [r.esper["detail"] for r in warnings_of(caplog)]
    assert len(details) == 2, details  # one WARNING per kind of refusal, not per call or per size
    assert "is 65" in details[0] and "outside guard range [1, 64]" in details[0]
    assert "float64" in details[1]
    assert all(r.esper["reason"] == "outside-guards" for r in warnings_of(caplog))
    kernel(torch.randn(4, 256))
    assert kernel.last_path == COMPILED


def test_weights_that_no_longer_match_the_artifact_train_eager(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = load(training_urza, "lora_adapter")
    x = torch.randn(4, 256)
    kernel.seed.base.weight.requires_grad_(True)  # compiled with the base frozen: no gradient for it
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        _, got = gradients(kernel, (x,), weights=kernel.seed)
    assert kernel.last_path == EAGER and "base.weight" in got
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "weights-changed" and "'base.weight'" in record.esper["detail"]
    kernel.seed.base.weight.requires_grad_(False)
    kernel(x)
    assert kernel.last_path == COMPILED
    kernel.double()
    kernel(x.double())
    assert kernel.last_path == EAGER


def test_a_weight_schema_mismatch_is_an_error_naming_the_tensor(training_urza: Path) -> None:
    kernel = load(training_urza, "lora_adapter")
    good = build("lora_adapter").state_dict()
    wrong_shape = {**good, "lora_a.weight": torch.zeros(4, 256)}
    cases = [
        (wrong_shape, r"'lora_a.weight' is float32\[4, 256\]; .* expects float32\[8, 256\]"),
        ({k: v for k, v in good.items() if k != "base.bias"}, r"lack 'base.bias' \(float32\[256\]\)"),
        ({**good, "extra.weight": torch.zeros(1)}, r"'extra.weight' is not a weight of"),
        ({**good, "lora_b.weight": good["lora_b.weight"].double()}, r"'lora_b.weight' is float64\[256, 8\]"),
        ({**good, "base.weight": 1.0}, r"'base.weight' is a float, not a Tensor"),
    ]
    for state, pattern in cases:
        with pytest.raises(WeightSchemaError, match=pattern):
            kernel.bind(state)
    with pytest.raises(WeightSchemaError, match=r"lora_a\.weight"):
        load(training_urza, "lora_adapter", wrong_shape)


def test_seeds_share_the_program_and_hold_their_own_weights(training_urza: Path) -> None:
    base = load(training_urza, "lora_adapter")
    a, b = base.bind(perturbed("lora_adapter", 1)), base.bind(perturbed("lora_adapter", 2))
    assert a.program is b.program is base.program is not None
    assert a.seed is not b.seed and a.seed.lora_a.weight.data_ptr() != b.seed.lora_a.weight.data_ptr()
    torch.optim.SGD(a.parameters(), lr=1.0).zero_grad()
    x = torch.randn(3, 256)
    a(x).sum().backward()
    assert a.seed.lora_a.weight.grad is not None and b.seed.lora_a.weight.grad is None


def test_a_damaged_training_artifact_trains_eager(training_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Urza(training_copy, readonly=True) as urza:
        (entry,) = [e for e in urza.entries("tiny_bn") if e.artifact == ArtifactKind.TRAINING]
        path = urza.store.path_for(entry.checksum)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="esper.kasmina"):
        kernel = load(training_copy, "tiny_bn")
    assert kernel.route == EAGER
    (record,) = warnings_of(caplog)
    assert record.esper["reason"] == "integrity" and "checksum" in record.esper["detail"]


def test_an_eager_route_chosen_by_measurement_loads_without_a_warning(
    training_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from esper.artifacts.kinds import ArtifactKind
    from esper.tezzeret.compiler import Tezzeret

    with Urza(training_copy) as urza:
        route = Tezzeret(urza).store_eager_route(
            CATALOG_TRAINING.get("tiny_bn"),
            artifact=ArtifactKind.TRAINING,
            profile="default",
            guards=None,
            evidence={},
            reason="eager measured faster",
        )
    with caplog.at_level(logging.INFO, logger="esper.kasmina"):
        kernel = load(training_copy, "tiny_bn")
    assert kernel.route == EAGER and kernel.entry == route
    assert kernel.reason == f"certified to train eager (entry #{route.id}): eager measured faster"
    assert warnings_of(caplog) == []
    (info,) = [r for r in caplog.records if r.name == "esper.kasmina"]
    assert info.esper["event"] == "eager-by-evidence" and info.esper["entry"] == route.id  # type: ignore[attr-defined]


def test_prewarm_leaves_the_seed_untouched(training_urza: Path) -> None:
    kernel = load(training_urza, "tiny_bn")
    for (n, a), b in zip(kernel.seed.state_dict().items(), build("tiny_bn").state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_manifest_round_trips_and_refuses_a_newer_format(training_urza: Path) -> None:
    import zipfile

    with Urza(training_urza, readonly=True) as urza:
        (entry,) = [e for e in urza.entries("tiny_bn") if e.artifact == ArtifactKind.TRAINING]
        with zipfile.ZipFile(urza.store.verify(entry.checksum, entry.artifact_size)) as z:
            text = z.read("manifest.json")
    manifest = TrainingManifest.from_json(text)
    assert TrainingManifest.from_json(manifest.to_json()) == manifest
    assert manifest.mutated() == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert set(manifest.weights()) == set(build("tiny_bn").state_dict())
    newer = {**json.loads(text), "version": 99}
    from esper.artifacts.guards import SchemaVersionError

    with pytest.raises(SchemaVersionError):
        TrainingManifest.from_json(json.dumps(newer))


def test_inference_routing_ignores_training_entries(training_urza: Path) -> None:
    with Urza(training_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_bn")
    assert entry.status == "certified" and entry.artifact == ArtifactKind.TRAINING  # certified, the other kind
    kernel = Kasmina(training_urza, blueprint_paths=[TRAINING, CATALOG]).load("tiny_bn")
    assert kernel.route == EAGER and kernel.routes == ()
    assert kernel.reason == "Urza has no entry for it"


def test_the_eager_reference_is_untouched_by_kernels(training_urza: Path) -> None:
    """Binding copies a state dict: the caller's tensors are not the seed's."""
    state = perturbed("tiny_bn", 5)
    before = copy.deepcopy(state)
    kernel = load(training_urza, "tiny_bn", state)
    kernel(torch.randn(4, 8)).sum().backward()
    torch.optim.SGD(kernel.parameters(), lr=1.0).step()
    for n, t in state.items():
        assert torch.equal(t, before[n]), n


def test_a_seed_with_its_trained_weights_frozen_trains_its_inputs_eager(
    training_urza: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A fossilized seed in a host that still trains: only the input's gradient is wanted. The compiled step
    # computes the weights' gradients as well (more work than eager, and never timed so): eager serves it.
    kernel = load(training_urza, "lora_adapter")
    eager = build("lora_adapter").train()
    eager.load_state_dict(kernel.seed.state_dict())
    x = torch.randn(4, 256)
    kernel(x.requires_grad_()).sum().backward()
    assert kernel.last_path == COMPILED  # the twin: weights training, the compiled step
    kernel.seed.requires_grad_(False)
    eager.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="esper.kasmina"):
        for _ in range(2):
            got_x = x.detach().clone().requires_grad_()
            kernel(got_x).sum().backward()
            assert kernel.last_path == EAGER
    want_x = x.detach().clone().requires_grad_()
    eager(want_x).sum().backward()
    torch.testing.assert_close(got_x.grad, want_x.grad)
    told = [r for r in caplog.records if getattr(r, "esper", {}).get("event") == "frozen-weights"]
    assert len(told) == 1 and told[0].levelno == logging.INFO and not warnings_of(caplog)
    kernel(x.detach())  # nothing wants a gradient: the compiled forward
    assert kernel.last_path == COMPILED
    kernel.seed.lora_b.weight.requires_grad_(True)  # one trained weight thaws: the compiled step again
    kernel(x.detach().requires_grad_()).sum().backward()
    assert kernel.last_path == COMPILED
