#!/usr/bin/env python
"""Grow a network while it trains, with its seeds served by Kasmina, on real data.

A host MLP learns scikit-learn's ``load_digits`` (1,797 real 8x8 images of handwritten digits, shipped inside
the package: nothing is downloaded). Its hidden activations pass through *slots*, where seeds of one catalog
blueprint (``residual_mlp`` by default; any blueprint taking one ``(batch, width)`` float32 input fits) are
grafted at chosen steps:

1. **germinate**: ``Kasmina.load_training(name, weights)`` gives the seed its compiled forward and backward
   (the first seed loads the certified training artifact; later seeds ``bind`` their own weights to it);
2. **train and blend**: the seed's own parameters get their own optimizer, and the slot outputs
   ``lerp(h, seed(h), alpha)`` with ``alpha`` ramped from 0 to 1, so the host never sees a jump;
3. **fossilize**: the seed's weights are frozen; it stays in the graph (gradients still reach the layers
   below it) and, in ``eval()``, is served by the certified inference kernel bound to its weights.

Several seeds of the blueprint, each with its own weights, train at once. The same run with every seed an
eager module (same seed weights, data order and host initialization) runs in lockstep as the reference. Step
by step: before every step a third run takes the eager run's state and steps it with compiled seeds; that
step's loss and predictions must agree with eager's within the tolerance certification promises
(:func:`step_tolerance`: the blueprint's, atol widened by 32x how far eager itself moves when only its rounding
changes), or the script exits 1. The free-running compiled run is reported beside it: single steps that agree
to rounding can still part over hundreds of steps (measured: on 2 threads, residual_mlp's free-running runs
parted from step 161, loss 3.5e-4 apart at step 198, while every step from eager's state agreed to 7.5e-8).
It reports host validation accuracy before and after growth, the training step time with compiled against
eager seeds, the germination stall against a cold ``torch.compile`` of the same seed (measured last: it
imports the compiler, which Kasmina never does), and every message Kasmina logged.

It needs an Urza holding a certified training artifact for the blueprint::

    .venv/bin/pytest --certify                 # the README's first command: the whole catalog, .esper/urza.db
    .venv/bin/pytest --certify -k residual_mlp # or only the blueprint this example grafts
    .venv/bin/python examples/grow.py [--urza PATH] [--steps N] [--blueprint NAME] [--blueprints DIR]

The optimizers are plain SGD with momentum written out (:class:`SGD`): constructing a ``torch.optim``
optimizer imports ``torch._dynamo`` in torch 2.13, which would hide whether Kasmina imported it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from esper.blueprint import Blueprint, Dim, Tolerance
from esper.kasmina import COMPILED, Kasmina, TrainingKernel
from esper.numerics.gradients import SLACK, tolerance
from esper.settings import resolve

CERTIFY_HINT = (
    "certify it first: `.venv/bin/pytest --certify` (the README's first command, the whole catalog into "
    ".esper/urza.db) or `.venv/bin/pytest --certify -k {name}` (this blueprint only), then pass that Urza "
    "with --urza"
)
N_SLOTS = 3
CLASSES = 10
PIXELS = 64


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """What one run of the example does."""

    urza: Path | None
    blueprint: str
    blueprints: tuple[Path, ...]
    steps: int
    lr: float
    seed_lr: float
    json: Path | None
    torch_compile: bool
    threads: int | None


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line, as :class:`Options`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=CERTIFY_HINT.format(name="NAME"))
    p.add_argument("--urza", type=Path, help="certified Urza (default: $ESPER_URZA, [tool.esper] urza, .esper/urza.db)")
    p.add_argument("--blueprint", default="residual_mlp", help="the seeds' blueprint (default residual_mlp)")
    p.add_argument("--blueprints", type=Path, action="append", default=[], help="extra blueprint folder (repeatable)")
    p.add_argument("--steps", type=_at_least(20), default=400, help="training steps (default 400, at least 20)")
    p.add_argument("--lr", type=float, default=0.05, help="host learning rate (SGD, momentum 0.9)")
    p.add_argument("--seed-lr", type=float, default=0.02, help="seeds' learning rate (SGD, momentum 0.9)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument(
        "--no-torch-compile", dest="torch_compile", action="store_false", help="skip the cold torch.compile figure"
    )
    p.add_argument("--threads", type=_at_least(1), help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    return Options(
        a.urza, a.blueprint, tuple(a.blueprints), a.steps, a.lr, a.seed_lr, a.json, a.torch_compile, a.threads
    )


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits, pixels scaled to [0, 1], split once into training and validation sets."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1,797 digits, shuffled by ``seed``, the first ``val_fraction`` held out for validation."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images / 16.0, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return Digits(x[train], y[train], x[val], y[val])


def batch_order(n: int, batch: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: reshuffled each epoch, incomplete batches dropped (fixed shapes)."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


# ------------------------------------------------------------------------------------------- the host


class Slot(nn.Module):
    """Where a seed grafts in: the identity while dormant, then ``lerp(h, seed(h), alpha)``."""

    def __init__(self) -> None:
        super().__init__()
        self.seed: nn.Module | None = None
        self.alpha = 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return h
        return torch.lerp(h, self.seed(h), self.alpha)


class Host(nn.Module):
    """``64 -> width -> width -> 10`` with ReLUs; slot 0 after the first layer, slots 1 and 2 after the second."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Linear(PIXELS, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)
        self.slots = nn.ModuleList(Slot() for _ in range(N_SLOTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.slots[0](F.relu(self.stem(x)))
        h = self.slots[2](self.slots[1](F.relu(self.hidden(h))))
        return self.head(h)

    def own_parameters(self) -> list[nn.Parameter]:
        """The host's parameters, not its seeds' (each seed has its own optimizer)."""
        return [p for name, p in self.named_parameters() if not name.startswith("slots.")]


def make_host(width: int, seed: int = 0) -> Host:
    """The host with the weights every run starts from."""
    torch.manual_seed(seed)
    return Host(width)


class SGD:
    """SGD with momentum, written out: a ``torch.optim`` optimizer would import ``torch._dynamo`` (torch 2.13)."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, momentum: float = 0.9):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        self.velocity = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """Update in place: a compiled seed reads its weights as package inputs, so nothing needs rebinding."""
        for p, v in zip(self.params, self.velocity, strict=True):
            if p.grad is not None:
                v.mul_(self.momentum).add_(p.grad)
                p.add_(v, alpha=-self.lr)
                p.grad = None


# ----------------------------------------------------------------------------------------- the seeds


@dataclass(frozen=True)
class Schedule:
    """When each slot's seed germinates, how long its alpha ramps, and when it is fossilized."""

    germinate: tuple[int, ...]
    ramp: int
    train: int

    def alpha(self, slot: int, step: int) -> float:
        """The blend weight of ``slot``'s seed at ``step`` (0 before germination, 1 after the ramp)."""
        since = step - self.germinate[slot]
        return 0.0 if since < 0 else min(1.0, (since + 1) / self.ramp)

    def fossilizes(self, slot: int, step: int) -> bool:
        return step == self.germinate[slot] + self.train

    @property
    def growth_starts(self) -> int:
        return min(self.germinate)


def schedule_for(steps: int) -> Schedule:
    """Seeds germinate at 25%, 35% and 45% of the run, ramp in over 10% and train for 35% of it; the run ends
    with every seed fossilized for the last 20%. Seeds overlap: at 45%-60% all three train at once."""
    return Schedule(
        germinate=tuple(int(steps * f) for f in (0.25, 0.35, 0.45)),
        ramp=max(1, steps // 10),
        train=max(2, int(steps * 0.35)),
    )


def seed_weights(bp: Blueprint, slot: int) -> dict[str, torch.Tensor]:
    """Slot ``slot``'s own initial weights: the blueprint's module, every layer re-initialized its own way
    (``reset_parameters``) from a generator seeded by the slot. The two runs start each seed from these."""
    module = bp.build()
    torch.manual_seed(1000 + slot)
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class CompiledSeeds:
    """Germinates seeds through Kasmina: the first loads the certified training artifact, the rest bind their
    own weights to the same loaded program."""

    def __init__(self, kasmina: Kasmina, name: str):
        self.kasmina = kasmina
        self.name = name
        self.first: TrainingKernel | None = None

    def __call__(self, weights: dict[str, torch.Tensor]) -> TrainingKernel:
        if self.first is None:
            self.first = self.kasmina.load_training(self.name, weights)
            if self.first.route != COMPILED:
                raise NotCertified(f"Kasmina gives {self.name!r} no compiled training route ({self.first.reason})")
            return self.first
        return self.first.bind(weights)


class EagerSeeds:
    """Germinates each seed as the blueprint's eager module holding the same weights, in ``dtype``: the
    reference (float32) and the yardstick for float32 rounding (float64)."""

    def __init__(self, bp: Blueprint, dtype: torch.dtype = torch.float32):
        self.bp = bp
        self.dtype = dtype

    def __call__(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        module = self.bp.build()
        module.load_state_dict(weights)
        return module.to(self.dtype).train()


class NotCertified(RuntimeError):
    """The Urza holds no certified training artifact for the blueprint (Kasmina would train it eager)."""


# -------------------------------------------------------------------------------------------- one run


@dataclass
class StepRecord:
    """What one training step measured."""

    loss: float
    logits: torch.Tensor
    seconds: float
    germinated: list[tuple[int, float]] = field(default_factory=list)  # (slot, seconds to germinate)
    seed_paths: list[str | None] = field(default_factory=list)  # each live seed's last path (compiled run)


class Run:
    """One training run of the host, its seeds germinated by ``germinate`` on the schedule."""

    def __init__(
        self,
        host: Host,
        germinate: Callable[[dict[str, torch.Tensor]], nn.Module],
        weights: Sequence[dict[str, torch.Tensor]],
        schedule: Schedule,
        lr: float,
        seed_lr: float,
        dtype: torch.dtype = torch.float32,
        reverse: bool = False,
    ):
        self.host = host.to(dtype)
        self.dtype = dtype
        self.reverse = reverse  # feed each batch's rows in reverse order: another float32 summation order
        self.germinate = germinate
        self.weights = weights
        self.schedule = schedule
        self.seed_lr = seed_lr
        self.optimizers: list[SGD] = [SGD(host.own_parameters(), lr)]
        self.seed_optimizers: dict[int, SGD] = {}

    def seeds(self) -> list[nn.Module]:
        return [s.seed for s in self.host.slots if s.seed is not None]

    def _lifecycle(self, step: int) -> list[tuple[int, float]]:
        """Germinate, ramp and fossilize the slots' seeds for ``step``; returns the germinations timed."""
        timed = []
        for k, slot in enumerate(self.host.slots):
            if step == self.schedule.germinate[k]:
                started = time.perf_counter()
                slot.seed = self.germinate(self.weights[k])
                timed.append((k, time.perf_counter() - started))
                self.seed_optimizers[k] = SGD(list(slot.seed.parameters()), self.seed_lr)
            if self.schedule.fossilizes(k, step):
                del self.seed_optimizers[k]
                slot.seed.requires_grad_(False)
            slot.alpha = self.schedule.alpha(k, step)
        return timed

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> StepRecord:
        """One training step: lifecycle, forward, backward, the host's and the live seeds' updates."""
        started = time.perf_counter()
        germinated = self._lifecycle(step)
        if self.reverse:
            x, y = x.flip(0), y.flip(0)
        logits = self.host(x.to(self.dtype))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        for opt in (*self.optimizers, *self.seed_optimizers.values()):
            opt.step()
        seconds = time.perf_counter() - started
        paths = [getattr(s, "last_path", None) for s in self.seeds()]
        logits = logits.detach().flip(0) if self.reverse else logits.detach()
        return StepRecord(loss.item(), logits, seconds, germinated, paths)

    @torch.no_grad()
    def sync_from(self, other: Run) -> None:
        """Take ``other``'s state in place: the host's and the live seeds' weights and optimizer velocities."""
        for mine, theirs in zip(self.host.parameters(), other.host.parameters(), strict=True):
            mine.copy_(theirs)
        for mine, theirs in zip(self._optimizers(), other._optimizers(), strict=True):
            for v, w in zip(mine.velocity, theirs.velocity, strict=True):
                v.copy_(w)

    def _optimizers(self) -> list[SGD]:
        return [*self.optimizers, *(self.seed_optimizers[k] for k in sorted(self.seed_optimizers))]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Validation logits in ``eval()`` mode, in batches the seeds' guards accept: a compiled seed is served
        by its certified inference kernel bound to its weights."""
        self.host.eval()
        try:
            return torch.cat([self.host(x[i : i + batch].to(self.dtype)) for i in range(0, len(x), batch)])
        finally:
            self.host.train()


# ------------------------------------------------------------------------------------------- agreement


class Disagreement(AssertionError):
    """The compiled-seed run left the eager-seed run's results by more than the certified tolerance."""


def step_tolerance(tol: Tolerance, eager: Any, references: Sequence[Any]) -> Tolerance:
    """The tolerance certification promises for compiled against eager, for one step of training: the
    blueprint's ``atol``, widened by :data:`esper.numerics.gradients.SLACK` times how far eager moves when only its
    rounding changes (:func:`esper.numerics.gradients.tolerance`, the rule grad parity is certified by, against each
    reference: the same run in float64, and in float32 with each batch's rows reversed), and its ``rtol``.

    Rounding compounds over steps, and where training nears a tipping point two float32 runs that differ only
    in summation order part (measured in a 400-step run on another shuffle of the data: from step ~237 the
    reversed-rows run and the compiled run left eager's loss by 3e-4, then 1e-3, together). Until the
    references part the bound is the blueprint's own, so a wrong compiled seed shows from its germination on."""
    widened = max(tolerance(tol.atol, tol.rtol, eager, ref)[0] for ref in references)
    return Tolerance(widened, tol.rtol)


def loss_bound(tol: Tolerance, eager: float) -> float:
    """How far the compiled run's loss may be from eager's: ``atol + rtol * |eager|``, as ``assert_close``."""
    return tol.atol + tol.rtol * abs(eager)


def ambiguous(logits: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """Rows whose top-2 logit margin is within two tolerances: the only rows whose prediction may differ
    between two runs that agree within ``tol``."""
    top = logits.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) <= 2 * (tol.atol + tol.rtol * top[:, 0].abs())


def check_predictions(compiled: torch.Tensor, eager: torch.Tensor, tol: Tolerance, where: str) -> None:
    """Raise :class:`Disagreement` if a prediction differs where eager's margin is beyond the tolerance."""
    differ = compiled.argmax(1) != eager.argmax(1)
    unexplained = differ & ~ambiguous(eager, tol)
    if unexplained.any():
        rows = unexplained.nonzero().flatten().tolist()[:5]
        raise Disagreement(f"{where}: predictions differ on rows {rows} whose eager logit margin exceeds {tol}")


def check_step(
    step: int, compiled: StepRecord, eager: StepRecord, references: Sequence[StepRecord], tol: Tolerance
) -> float:
    """Compare one step of compiled and eager seeds taken from the same state (loss, the batch's predictions,
    the path each seed call took) at the step's tolerance; return the loss difference as a fraction of its
    bound."""
    loss_tol = step_tolerance(tol, torch.tensor(eager.loss), [torch.tensor(r.loss) for r in references])
    diff, bound = abs(compiled.loss - eager.loss), loss_bound(loss_tol, eager.loss)
    if diff > bound:
        refs = ", ".join(f"{r.loss:.7f}" for r in references)
        raise Disagreement(
            f"step {step}: loss {compiled.loss:.7f} (compiled seeds) vs {eager.loss:.7f} (eager seeds), "
            f"difference {diff:.2e} > {bound:.2e} ({loss_tol}; eager's rounding references: {refs})"
        )
    logits_tol = step_tolerance(tol, eager.logits, [r.logits for r in references])
    check_predictions(compiled.logits, eager.logits, logits_tol, f"step {step}, training batch")
    check_paths(step, compiled)
    return diff / bound


def check_paths(step: int, compiled: StepRecord) -> None:
    """Raise :class:`Disagreement` if a compiled seed's training call ran anything but its compiled code."""
    fell_back = [p for p in compiled.seed_paths if p != COMPILED]
    if fell_back:
        raise Disagreement(f"step {step}: a compiled seed's training call ran {fell_back[0]}")


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------- measurements


class Collect(logging.Handler):
    """Keeps every record Kasmina logs (INFO and up) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def median_ms(records: Sequence[StepRecord], steps: Sequence[int]) -> float:
    return statistics.median(records[i].seconds for i in steps) * 1e3 if steps else float("nan")


def cold_torch_compile(bp: Blueprint, weights: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, float]:
    """What ``torch.compile`` of the same seed costs cold in this process: importing the compiler, then the
    first forward and backward on an input of the training batch's shape (``dynamic=True``, as the README's
    benchmarks), with an empty Inductor cache. Run it last: afterwards the compiler is imported here."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="grow-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            started = time.perf_counter()
            import torch._dynamo  # what torch.compile imports on first use
            import torch._inductor

            imported = time.perf_counter()
            module = EagerSeeds(bp)(weights)
            compiled = torch.compile(module, dynamic=True)
            out = compiled(x.detach().clone().requires_grad_(True))
            out.sum().backward()
            done = time.perf_counter()
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    return {"import_ms": (imported - started) * 1e3, "first_step_ms": (done - imported) * 1e3}


# -------------------------------------------------------------------------------------------- the loop


def seed_input(bp: Blueprint) -> tuple[Dim, int]:
    """The blueprint's batch dim and width: it must take one float32 ``(batch, width)`` input to fit a slot."""
    if len(bp.inputs) != 1:
        raise SystemExit(f"blueprint {bp.name!r} takes {len(bp.inputs)} inputs; a slot feeds one")
    inp = bp.inputs[0]
    if inp.dtype != "float32" or len(inp.shape) != 2 or not isinstance(inp.shape[0], Dim):
        raise SystemExit(f"blueprint {bp.name!r} takes {inp.dtype} {inp.shape}; a slot feeds float32 (batch, width)")
    if not isinstance(inp.shape[1], int):
        raise SystemExit(f"blueprint {bp.name!r}: its width {inp.shape[1]} is dynamic; a host needs a fixed one")
    return inp.shape[0], inp.shape[1]


# The runs of one lockstep, in order: compiled seeds (free-running), eager seeds, eager's rounding references
# (float64; float32 with each batch's rows reversed), the host alone, and compiled seeds stepped from the eager
# run's state (the one whose every step is checked).
SYNCED = "compiled, from eager's state"
RUNS = ("compiled", "eager", "float64", "reversed rows", "host alone", SYNCED)


@dataclass
class Lockstep:
    """What the lockstep loop gathered: each run's step records, validation accuracies and last logits."""

    records: dict[str, list[StepRecord]] = field(default_factory=lambda: {"compiled": [], "eager": []})
    accuracy: dict[str, dict[str, float]] = field(default_factory=lambda: {label: {} for label in RUNS})
    logits: list[torch.Tensor] = field(default_factory=list)
    max_step_difference: float = 0.0  # the largest |compiled - eager| loss difference of one step from one state
    max_bound_used: float = 0.0  # the largest such difference as a fraction of that step's bound
    max_loss_difference: float = 0.0  # the largest |compiled - eager| loss difference of the free-running runs
    parted: int | None = None  # the first step where the free-running runs differ by more than the bound
    references_part: int | None = None  # the first step where eager's rounding references leave it by > atol


def rotated_steps(runs: Sequence[Run], step: int, x: torch.Tensor, y: torch.Tensor) -> list[StepRecord]:
    """Each run's ``step``, started from a different run each step so that no run always goes first (on a
    shared CPU the first run after the others measured several times slower, the same work included)."""
    first = step % len(runs)
    records: dict[int, StepRecord] = {}
    for k in [*range(first, len(runs)), *range(first)]:
        records[k] = runs[k].step(step, x, y)
    return [records[k] for k in range(len(runs))]


def lockstep(
    runs: Sequence[Run], data: Digits, order: Sequence[torch.Tensor], evals: set[int], tol: Tolerance
) -> Lockstep:
    """Step every run of :data:`RUNS` on the same batches. Before each step the ``"from eager's state"`` run
    takes the eager run's state, so that its step is compiled seeds on exactly eager's inputs and weights:
    that step is checked at the tolerance the references give (and its predictions on the validation set at
    each step in ``evals``). The free-running compiled run is compared with eager too, and reported."""
    eager_run, synced_run = runs[RUNS.index("eager")], runs[RUNS.index(SYNCED)]
    out, batch = Lockstep(), len(order[0])
    for step in range(len(order) + 1):
        if step in evals:
            out.logits = [r.evaluate(data.val_x, batch) for r in runs]
            val_tol = step_tolerance(tol, out.logits[1], out.logits[2:4])
            check_predictions(out.logits[RUNS.index(SYNCED)], out.logits[1], val_tol, f"validation at step {step}")
            for label, lg in zip(out.accuracy, out.logits, strict=True):
                out.accuracy[label][str(step)] = accuracy(lg, data.val_y)
        if step == len(order):
            return out
        x, y = data.train_x[order[step]], data.train_y[order[step]]
        synced_run.sync_from(eager_run)
        compiled, eager, float64, reversed_rows, _, synced = rotated_steps(runs, step, x, y)
        references = [float64, reversed_rows]
        out.records["compiled"].append(compiled)
        out.records["eager"].append(eager)
        out.max_bound_used = max(out.max_bound_used, check_step(step, synced, eager, references, tol))
        out.max_step_difference = max(out.max_step_difference, abs(synced.loss - eager.loss))
        check_paths(step, compiled)
        if out.references_part is None and max(abs(r.loss - eager.loss) for r in references) > tol.atol:
            out.references_part = step
        free = abs(compiled.loss - eager.loss)
        loss_tol = step_tolerance(tol, torch.tensor(eager.loss), [torch.tensor(r.loss) for r in references])
        if out.parted is None and free > loss_bound(loss_tol, eager.loss):
            out.parted = step
        out.max_loss_difference = max(out.max_loss_difference, free)
    return out


def train(opts: Options, kasmina: Kasmina, bp: Blueprint) -> dict[str, Any]:
    """The compiled-seed run, the eager-seed run and the host alone, in lockstep; returns the figures."""
    batch_dim, width = seed_input(bp)
    batch = min(64, batch_dim.max)
    data = load_digits_split()
    order = batch_order(len(data.train_x), batch, opts.steps)
    schedule = schedule_for(opts.steps)
    never = Schedule((opts.steps,) * N_SLOTS, 1, 1)
    weights = [seed_weights(bp, k) for k in range(N_SLOTS)]
    runs = [
        Run(make_host(width), CompiledSeeds(kasmina, bp.name), weights, schedule, opts.lr, opts.seed_lr),
        Run(make_host(width), EagerSeeds(bp), weights, schedule, opts.lr, opts.seed_lr),
        Run(make_host(width), EagerSeeds(bp, torch.float64), weights, schedule, opts.lr, opts.seed_lr, torch.float64),
        Run(make_host(width), EagerSeeds(bp), weights, schedule, opts.lr, opts.seed_lr, reverse=True),
        Run(make_host(width), EagerSeeds(bp), weights, never, opts.lr, opts.seed_lr),  # the control
        Run(make_host(width), CompiledSeeds(kasmina, bp.name), weights, schedule, opts.lr, opts.seed_lr),
    ]
    evals = {schedule.growth_starts, opts.steps, *range(0, opts.steps + 1, max(1, opts.steps // 10))}
    done = lockstep(runs, data, order, evals, bp.tolerance)
    served = serve(kasmina, bp.name, runs[0].host, data.val_x, batch)
    # Serving reproduces the trained compiled host (its own eval logits, the same weights through the same
    # certified inference kernels), whatever the free-running run's distance from eager.
    check_predictions(served, done.logits[0], bp.tolerance, "the served host (load_seeds + bind) against training's")
    return {
        "blueprint": bp.name,
        "width": width,
        "batch": batch,
        "steps": opts.steps,
        "schedule": {"germinate": list(schedule.germinate), "ramp": schedule.ramp, "train": schedule.train},
        "tolerance": {"atol": bp.tolerance.atol, "rtol": bp.tolerance.rtol},
        "max_step_difference": done.max_step_difference,
        "max_bound_used": done.max_bound_used,
        "max_loss_difference": done.max_loss_difference,
        "parted_at": done.parted,
        "references_part_at": done.references_part,
        "validation_accuracy": done.accuracy,
        "served_accuracy": accuracy(served, data.val_y),
        "timing": timing(done.records, schedule, opts.steps),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "seed_calls": [dict(s.calls) for r in (runs[0], runs[-1]) for s in r.seeds()],
        "_seed_input": torch.randn(batch, width, generator=torch.Generator().manual_seed(0)),
        "_weights": weights[0],
    }


def serve(kasmina: Kasmina, name: str, trained: Host, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Deploy the grown host: a fresh host with the trained host's weights whose slots hold the seeds'
    weights bound to the certified inference kernel (``load_seeds(name).bind(seed)``); its validation logits."""
    base = kasmina.load_seeds(name)
    host = Host(trained.stem.out_features)
    host.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("slots.")}, strict=False)
    for slot, grown in zip(host.slots, trained.slots, strict=True):
        slot.seed, slot.alpha = base.bind(grown.seed.seed), 1.0  # type: ignore[union-attr]
    with torch.no_grad():
        return torch.cat([host.eval()(x[i : i + batch]) for i in range(0, len(x), batch)])


def _rest_of_step(record: StepRecord) -> float:
    """A germination step's time without the germinations themselves: the first training step's cost."""
    return record.seconds - sum(s for _, s in record.germinated)


def timing(records: dict[str, list[StepRecord]], schedule: Schedule, steps: int) -> dict[str, Any]:
    """Step times (median while seeds live, germination steps excluded) and the germination stalls."""
    germinating = set(schedule.germinate)
    grown = [i for i in range(schedule.growth_starts, steps) if i not in germinating]
    before = list(range(schedule.growth_starts))
    out: dict[str, Any] = {}
    for label, recs in records.items():
        stalls = [
            {"slot": k, "germinate_ms": s * 1e3, "first_step_ms": _rest_of_step(recs[i]) * 1e3}
            for i in sorted(germinating)
            for k, s in recs[i].germinated
        ]
        out[label] = {
            "step_ms_host_only": median_ms(recs, before),
            "step_ms_with_seeds": median_ms(recs, grown),
            "germination": stalls,
        }
    return out


# ------------------------------------------------------------------------------------------------ report


def report(fig: dict[str, Any], messages: list[logging.LogRecord]) -> str:
    """The figures as text (the torch.compile comparison, measured afterwards, is :func:`stall_comparison`)."""
    acc = fig["validation_accuracy"]
    start, end = str(fig["schedule"]["germinate"][0]), str(fig["steps"])
    t = fig["timing"]
    tol = fig["tolerance"]
    lines = [
        f"grow: host 64 -> {fig['width']} -> {fig['width']} -> 10 on load_digits, {fig['steps']} steps of "
        f"batch {fig['batch']}, {N_SLOTS} {fig['blueprint']!r} seeds germinated at steps "
        f"{fig['schedule']['germinate']}, alpha ramped over {fig['schedule']['ramp']} steps, fossilized "
        f"{fig['schedule']['train']} steps after germination",
        "",
        "validation accuracy (360 held-out digits)    compiled seeds   eager seeds   float64 eager   host alone",
        _accuracy_row(f"  before growth (step {start:>4})", acc, start),
        _accuracy_row(f"  after growth  (step {end:>4})", acc, end),
        f"  served: fresh host + load_seeds().bind(seed)  {fig['served_accuracy']:>6.2%}",
        "",
        "agreement with the eager-seed run, step by step: before every step a third run takes the eager run's "
        "state (weights, velocities) and steps it with compiled seeds; its loss is within atol + rtol x |loss| of "
        f"eager's, the blueprint's certified tolerance (atol {tol['atol']:g}, rtol {tol['rtol']:g}) with atol widened "
        f"by {SLACK:g}x how far eager moves when only rounding changes (the same run in float64, and with each "
        "batch's rows reversed; the rule grad parity is certified by); "
        + (
            f"those references first part from eager by more than atol at step {fig['references_part_at']}; "
            if fig["references_part_at"] is not None
            else "those references never part from eager by more than atol; "
        )
        + f"largest one-step difference {fig['max_step_difference']:.2e}, at most {fig['max_bound_used']:.2%} of its "
        "step's bound; predictions equal wherever eager's top-2 logit margin exceeds that tolerance; every training "
        "call of a compiled seed ran compiled",
        "free-running (the compiled-seed run on its own course, as a user trains): "
        + (
            f"it parts from the eager-seed run by more than the bound at step {fig['parted_at']} (rounding "
            "differences of single steps, each within the bound above, compound over the steps); "
            if fig["parted_at"] is not None
            else "it never parts from the eager-seed run by more than the bound; "
        )
        + f"largest loss difference {fig['max_loss_difference']:.2e}",
        "",
        f"training step time (median; {fig['threads']} torch threads, load average {fig['load_average']:.1f} on "
        f"{os.cpu_count()} CPUs)   compiled seeds   eager seeds   ratio",
        _timing_row("  host alone, before growth", t, "step_ms_host_only"),
        _timing_row("  with seeds (germinations excluded)", t, "step_ms_with_seeds"),
        "",
        "germination stall, per seed (ms)       compiled: load + first step   eager: build + first step",
    ]
    for c, e in zip(t["compiled"]["germination"], t["eager"]["germination"], strict=True):
        lines.append(
            f"  slot {c['slot']}{' (loads the artifact)' if c is t['compiled']['germination'][0] else ' (bind)':<22}"
            f"        {c['germinate_ms']:>7.1f} + {c['first_step_ms']:>6.1f}"
            f"            {e['germinate_ms']:>6.1f} + {e['first_step_ms']:>6.1f}"
        )
    warnings = [r for r in messages if r.levelno >= logging.WARNING]
    imported = ", ".join(fig["compiler_imported"]) or "neither torch._dynamo nor torch._inductor"
    lines += ["", f"imported by the training loop before the torch.compile figure: {imported}"]
    lines += [f"esper.kasmina WARNINGs: {len(warnings) or 'none'}; all it logged:"]
    lines += [f"  {r.levelname}: {r.getMessage()}" for r in messages]
    return "\n".join(lines)


def stall_comparison(fig: dict[str, Any], compiler: dict[str, float]) -> str:
    """The first germination's stall with Kasmina against a cold ``torch.compile`` of the same seed."""
    first = fig["timing"]["compiled"]["germination"][0]
    kasmina_ms = first["germinate_ms"] + first["first_step_ms"]
    cold = compiler["import_ms"] + compiler["first_step_ms"]
    return (
        f"germination stall of the first seed: Kasmina {kasmina_ms:.1f} ms (load + pre-warm + first host step) vs "
        f"cold torch.compile(dynamic=True) of the same seed in this process {cold:.0f} ms (import "
        f"{compiler['import_ms']:.0f} + first forward+backward {compiler['first_step_ms']:.0f}), "
        f"{cold / kasmina_ms:.0f}x longer"
    )


def _accuracy_row(label: str, acc: dict[str, dict[str, float]], step: str) -> str:
    c, e, x, h = (acc[k][step] for k in ("compiled", "eager", "float64", "host alone"))
    return f"{label:<44} {c:>8.2%}   {e:>11.2%}   {x:>13.2%}   {h:>10.2%}"


def _timing_row(label: str, t: dict[str, Any], key: str) -> str:
    c, e = t["compiled"][key], t["eager"][key]
    return f"{label:<38} {c:>8.2f} ms   {e:>8.2f} ms   {c / e:>5.2f}"


@contextlib.contextmanager
def kasmina_log() -> Iterator[Collect]:
    """Collect ``esper.kasmina``'s records for the duration (INFO included: eager-by-evidence decisions)."""
    log = logging.getLogger("esper.kasmina")
    handler, level = Collect(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    settings = resolve(urza=opts.urza, blueprint_paths=opts.blueprints)
    if not settings.urza.exists():
        print(f"no Urza at {settings.urza}; {CERTIFY_HINT.format(name=opts.blueprint)}", file=sys.stderr)
        return 2
    kasmina = Kasmina(settings.urza, blueprint_paths=settings.blueprint_paths)
    bp = kasmina.catalog.get(opts.blueprint)
    with kasmina_log() as handler:
        try:
            fig = train(opts, kasmina, bp)
        except NotCertified as e:
            print(f"{e}. If none is certified, {CERTIFY_HINT.format(name=opts.blueprint)}", file=sys.stderr)
            return 2
        except Disagreement as e:
            print(f"DISAGREEMENT between the compiled-seed and eager-seed runs: {e}", file=sys.stderr)
            return 1
    # Measured before the cold torch.compile below imports the compiler on purpose.
    fig["compiler_imported"] = sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)
    weights, probe = fig.pop("_weights"), fig.pop("_seed_input")
    messages = handler.records
    print(report(fig, messages), flush=True)
    compiler = cold_torch_compile(bp, weights, probe) if opts.torch_compile else None
    if compiler is not None:
        print(stall_comparison(fig, compiler))
    if opts.json is not None:
        fig["torch_compile_cold"] = compiler
        fig["kasmina_messages"] = [{"level": r.levelname, "message": r.getMessage()} for r in messages]
        opts.json.write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
