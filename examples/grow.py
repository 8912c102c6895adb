#!/usr/bin/env python
"""Grow a network while it trains, its seeds served by Kasmina from certified blueprints.

A host MLP learns scikit-learn's ``load_digits``. Seeds of one blueprint (``residual_mlp`` by default; any
taking one float32 ``(batch, width)`` input fits) germinate in three slots of its hidden layers: the first
through ``Kasmina.load_training``, the others ``bind`` their weights to the same program. Each trains with its
own optimizer, blends in (``lerp(h, seed(h), alpha)``), then is frozen and served by the certified inference
kernel. The grown host is deployed with ``load_seeds().bind()``. A twin run with eager seeds gives the
step-time ratio. A blueprint whose certified training route is eager trains eager, and the report says why.

    .venv/bin/pytest --certify -k residual_mlp    # or the README's first command (the whole catalog)
    .venv/bin/python examples/grow.py [--urza PATH] [--steps N] [--blueprint NAME] [--blueprints DIR]

The optimizers are plain SGD: ``torch.optim`` imports ``torch._dynamo`` in torch 2.13.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from esper.blueprint import Blueprint, Dim
from esper.kasmina import Kasmina
from esper.settings import resolve

CERTIFY_HINT = "certify it first: `.venv/bin/pytest --certify -k {name}`, then pass that Urza with --urza"
N_SLOTS = 3
LR, SEED_LR = 0.05, 0.02  # the host's and the seeds' learning rates (SGD, momentum 0.9)


def digits(batch: int, steps: int, seed: int = 0) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """``steps`` training batches of scikit-learn's digits (reshuffled each epoch, full batches only, so every
    step has one shape) and the held-out 20%: ``(batches, val_x, val_y)``."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x, y = torch.as_tensor(images / 16.0, dtype=torch.float32), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    val, train = order[: len(x) // 5], order[len(x) // 5 :]
    batches: list[tuple[Tensor, Tensor]] = []
    while len(batches) < steps:
        perm = train[torch.randperm(len(train), generator=g)]
        batches += [(x[i], y[i]) for i in perm[: len(perm) // batch * batch].split(batch)]
    return batches[:steps], x[val], y[val]


class Slot(nn.Module):
    """Where a seed grafts in: the identity while empty, then ``lerp(h, seed(h), alpha)``."""

    def __init__(self) -> None:
        super().__init__()
        self.seed: nn.Module | None = None
        self.alpha = 0.0

    def forward(self, h: Tensor) -> Tensor:
        return h if self.seed is None else torch.lerp(h, self.seed(h), self.alpha)


class Host(nn.Module):
    """``64 -> width -> width -> 10``; slot 0 after the first layer, slots 1 and 2 after the second."""

    def __init__(self, width: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # every run starts from the same host
        self.stem, self.hidden, self.head = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, 10)
        self.slots = nn.ModuleList(Slot() for _ in range(N_SLOTS))

    def forward(self, x: Tensor) -> Tensor:
        h = self.slots[0](F.relu(self.stem(x)))
        return self.head(self.slots[2](self.slots[1](F.relu(self.hidden(h)))))


class SGD:
    """SGD with momentum, updating in place: a compiled seed reads its weights as inputs, so nothing rebinds."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, momentum: float = 0.9):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self.velocity = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, v in zip(self.params, self.velocity, strict=True):
            if p.grad is not None:
                v.mul_(self.momentum).add_(p.grad)
                p.add_(v, alpha=-self.lr)
                p.grad = None


def seed_weights(bp: Blueprint, slot: int) -> dict[str, Tensor]:
    """Slot ``slot``'s own initial weights: the blueprint's module with every layer re-initialized."""
    module = bp.build()
    torch.manual_seed(1000 + slot)
    for m in module.modules():
        if callable(reset := getattr(m, "reset_parameters", None)):
            reset()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def seed_input(bp: Blueprint) -> tuple[Dim, int]:
    """The blueprint's batch dim and width: a slot feeds one float32 ``(batch, width)`` input."""
    shape = bp.inputs[0].shape if len(bp.inputs) == 1 and bp.inputs[0].dtype == "float32" else ()
    if len(shape) != 2 or not isinstance(shape[0], Dim) or not isinstance(shape[1], int):
        raise SystemExit(f"blueprint {bp.name!r} does not take one float32 (batch, width) input; a slot feeds one")
    return shape[0], shape[1]


@dataclass(frozen=True)
class StepRecord:
    loss: float
    logits: Tensor
    seconds: float
    germinate_seconds: float  # 0 unless a seed germinated in this step


class Grower:
    """One training run: the host, three seeds germinated at 25%, 35% and 45% of the run, one optimizer each.

    A seed's alpha ramps from 0 to 1 over 10% of the run; it trains for 35% of the run, then is fossilized."""

    def __init__(
        self, host: Host, bp: Blueprint, weights: Sequence[dict[str, Tensor]], steps: int, kasmina: Kasmina | None
    ):
        self.host, self.bp, self.weights, self.kasmina = host, bp, weights, kasmina
        self.germinate_at = [int(steps * f) for f in (0.25, 0.35, 0.45)]
        self.ramp, self.train_for = max(1, steps // 10), max(2, int(steps * 0.35))
        own = [p for name, p in host.named_parameters() if not name.startswith("slots.")]  # seeds have their own
        self.optimizers: dict[str, SGD] = {"host": SGD(own, LR)}

    def step(self, step: int, x: Tensor, y: Tensor) -> StepRecord:
        started, germinated = time.perf_counter(), 0.0
        for k, slot in enumerate(self.host.slots):
            since = step - self.germinate_at[k]
            if since == 0:
                slot.seed = self.new_seed(k, self.weights[k])
                germinated = time.perf_counter() - started
                self.optimizers[f"seed {k}"] = SGD(list(slot.seed.parameters()), SEED_LR)
            if since == self.train_for:  # fossilize: frozen, gradients still reach the layers below
                del self.optimizers[f"seed {k}"]
                slot.seed.requires_grad_(False)
            slot.alpha = 0.0 if since < 0 else min(1.0, (since + 1) / self.ramp)
        logits = self.host(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        return StepRecord(loss.item(), logits.detach(), time.perf_counter() - started, germinated)

    def new_seed(self, slot: int, weights: dict[str, Tensor]) -> nn.Module:
        """Kasmina's training kernel (the first loads the artifact, the others bind to it); without Kasmina,
        the blueprint's own eager module."""
        if self.kasmina is None:
            module = self.bp.build()
            module.load_state_dict(weights)
            return module.train()
        if slot == 0:
            return self.kasmina.load_training(self.bp.name, weights)
        return self.host.slots[0].seed.bind(weights)  # type: ignore[union-attr,operator]


def deploy(kasmina: Kasmina, name: str, trained: Host) -> Host:
    """A fresh host with the trained weights, each slot's seed bound to the certified inference kernel."""
    base = kasmina.load_seeds(name)
    host = Host(trained.stem.out_features)
    host.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("slots.")}, strict=False)
    for slot, grown in zip(host.slots, trained.slots, strict=True):
        slot.seed, slot.alpha = base.bind(grown.seed.seed), 1.0  # type: ignore[union-attr]
    return host.eval()


@torch.no_grad()
def evaluate(host: Host, x: Tensor, batch: int) -> Tensor:
    """Logits in ``eval()``, in batches the seeds' guards accept (fossils are served for inference)."""
    mode = host.training
    logits = torch.cat([host.eval()(x[i : i + batch]) for i in range(0, len(x), batch)])
    host.train(mode)
    return logits


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def run(kasmina: Kasmina, bp: Blueprint, steps: int) -> dict[str, Any]:
    """Train the compiled-seed and eager-seed runs side by side; the figures a user would look at."""
    batch_dim, width = seed_input(bp)
    batch = min(64, batch_dim.max)
    batches, val_x, val_y = digits(batch, steps)
    weights = [seed_weights(bp, k) for k in range(N_SLOTS)]
    kasmina_run, eager_run = (Grower(Host(width), bp, weights, steps, k) for k in (kasmina, None))
    start = kasmina_run.germinate_at[0]
    records: dict[str, list[StepRecord]] = {"kasmina": [], "eager": []}
    before = None
    for step, (x, y) in enumerate(batches):
        if step == start:
            before = accuracy(evaluate(kasmina_run.host, val_x, batch), val_y)
        # Alternate which run goes first, so neither always pays for a cold cache.
        pair = [("kasmina", kasmina_run), ("eager", eager_run)][:: 1 if step % 2 else -1]
        for label, grower in pair:
            records[label].append(grower.step(step, x, y))
    first_seed = kasmina_run.host.slots[0].seed
    grown = [i for i in range(start, steps) if i not in kasmina_run.germinate_at]
    step_ms = {k: statistics.median(r[i].seconds for i in grown) * 1e3 for k, r in records.items()}
    stall = records["kasmina"][start]
    return {
        "blueprint": bp.name,
        "steps": steps,
        "training_route": first_seed.route,  # type: ignore[union-attr]
        "training_reason": first_seed.reason,  # type: ignore[union-attr]
        "seed_calls": [dict(s.seed.calls) for s in kasmina_run.host.slots],  # type: ignore[union-attr]
        "accuracy_before_growth": before,
        "accuracy_after_growth": accuracy(evaluate(kasmina_run.host, val_x, batch), val_y),
        "accuracy_deployed": accuracy(evaluate(deploy(kasmina, bp.name, kasmina_run.host), val_x, batch), val_y),
        "step_ms": step_ms,
        "step_ratio": step_ms["kasmina"] / step_ms["eager"],
        "germination_ms": {"load": stall.germinate_seconds * 1e3, "first_step": stall.seconds * 1e3},
        "compiler_imported": sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules),
    }


def report(fig: dict[str, Any], messages: list[str]) -> str:
    route, g, ms = fig["training_route"], fig["germination_ms"], fig["step_ms"]
    eager_note = "" if route == "compiled" else "; the seeds train eager, as certification decided"
    lines = [
        f"grow: {N_SLOTS} {fig['blueprint']!r} seeds in a digits classifier, {fig['steps']} steps",
        f"training route: {route} ({fig['training_reason']}){eager_note}",
        f"validation accuracy: {fig['accuracy_before_growth']:.2%} before growth, "
        f"{fig['accuracy_after_growth']:.2%} after, {fig['accuracy_deployed']:.2%} deployed afresh",
        f"step time with seeds: Kasmina {ms['kasmina']:.2f} ms, eager seeds {ms['eager']:.2f} ms, "
        f"ratio {fig['step_ratio']:.2f}",
        f"germination stall of the first seed: {g['load']:.1f} ms to load, {g['first_step']:.1f} ms with its "
        "first step",
        f"compiler imported by the training loop: {', '.join(fig['compiler_imported']) or 'none'}",
        f"esper.kasmina logged {len(messages)} message(s)",
    ]
    return "\n".join(lines + [f"  {m}" for m in messages])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urza", type=Path, help="certified Urza (default: $ESPER_URZA, [tool.esper], .esper/urza.db)")
    p.add_argument("--blueprint", default="residual_mlp", help="the seeds' blueprint (default residual_mlp)")
    p.add_argument("--blueprints", type=Path, action="append", default=[], help="extra blueprint folder")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be at least 20")
    settings = resolve(urza=args.urza, blueprint_paths=args.blueprints)
    if not settings.urza.exists():
        print(f"no Urza at {settings.urza}; {CERTIFY_HINT.format(name=args.blueprint)}", file=sys.stderr)
        return 2
    kasmina = Kasmina(settings.urza, blueprint_paths=settings.blueprint_paths)
    log, collect = logging.getLogger("esper.kasmina"), BufferingHandler(capacity=100_000)
    log.addHandler(collect)
    log.setLevel(logging.INFO)  # INFO included: an eager route chosen by certification is logged at INFO
    fig = run(kasmina, kasmina.catalog.get(args.blueprint), args.steps)
    messages = [f"{r.levelname}: {r.getMessage()}" for r in collect.buffer]
    print(report(fig, messages))
    if args.json:
        args.json.write_text(json.dumps({**fig, "kasmina_messages": messages}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
