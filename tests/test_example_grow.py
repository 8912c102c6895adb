"""examples/grow.py: it runs whatever the Urza decided, and its compiled seeds train as eager seeds do.

The example is only the loop a user writes. The checking lives here: a lockstep of the example's own
training run with Kasmina's seeds against an independent eager oracle (the blueprint's module built from the
catalog, never Kasmina's eager module), every step taken from the oracle's state and judged at the tolerance
certification promises. ``tests/fixtures/grow/tiny_residual.py`` (the catalog's residual MLP at width 32) is
compiled into a temporary Urza, its inference and training artifacts marked certified as the session
fixtures do.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from esper.blueprint import Blueprint, Tolerance
from esper.catalog import load_catalog
from esper.kasmina import COMPILED, EAGER
from esper.numerics.gradients import tolerance

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "grow.py"
GROW = Path(__file__).parent / "fixtures" / "grow"
STEPS, BATCH = 40, 64


def example() -> ModuleType:
    """examples/grow.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("grow_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def tiny_residual() -> Blueprint:
    return load_catalog([GROW]).get("tiny_residual")


@dataclass(frozen=True)
class GrowUrza:
    path: Path
    training_id: int


@pytest.fixture(scope="module")
def grow_urza(tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path) -> GrowUrza:
    """An Urza holding ``tiny_residual``'s inference and training artifacts, compiled and marked certified."""
    from esper.artifacts.kinds import ArtifactKind
    from esper.tezzeret.compiler import Tezzeret
    from esper.urza import Urza

    path = tmp_path_factory.mktemp("grow-urza") / "urza.db"
    ids = {}
    with Urza(path) as urza:
        tezzeret = Tezzeret(urza)
        for artifact in (ArtifactKind.INFERENCE, ArtifactKind.TRAINING):
            entry = tezzeret.compile(tiny_residual(), artifact=artifact).entry
            assert entry.engine == "aoti", entry.failure_reason
            urza.update(entry.id, status="certified")  # type: ignore[arg-type]
            ids[artifact] = entry.id
    return GrowUrza(path, ids[ArtifactKind.TRAINING])


def figures(urza: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    args = ["--urza", str(urza), "--blueprints", str(GROW), "--blueprint", "tiny_residual", "--json", str(out)]
    done = run_example(*args, "--steps", str(STEPS))
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


# -- the example as a user runs it ------------------------------------------------------------------------


@pytest.mark.compiles
def test_the_example_trains_compiled_seeds_and_reports_the_step_ratio_and_the_stall(
    grow_urza: GrowUrza, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    done, fig = figures(grow_urza.path, tmp_path / "grow.json")
    assert fig["training_route"] == "compiled", fig["training_reason"]
    # Three seeds training on compiled code, each eager once fossilized (its weights frozen: only the input's
    # gradient is wanted), which Kasmina says once at INFO; nothing logged above INFO, no compiler imported.
    assert len(fig["seed_calls"]) == 3
    assert all(calls.get("compiled", 0) > 0 and calls.get("eager", 0) > 0 for calls in fig["seed_calls"])
    assert any("weights are frozen" in m for m in fig["kasmina_messages"])
    assert [m for m in fig["kasmina_messages"] if not m.startswith("INFO")] == []
    assert fig["compiler_imported"] == []
    assert fig["step_ratio"] > 0 and 0 < fig["germination_ms"]["load"] <= fig["germination_ms"]["first_step"]
    # The host deployed afresh (load_seeds + bind) predicts as the trained host did, up to a near tie.
    assert abs(fig["accuracy_deployed"] - fig["accuracy_after_growth"]) <= 1 / 359 + 1e-9
    assert "training route: compiled" in done.stdout and "ratio" in done.stdout and "germination" in done.stdout


@pytest.mark.compiles
def test_a_blueprint_without_a_compiled_training_route_trains_eager_and_exits_0(
    grow_urza: GrowUrza, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    from esper.urza import Urza

    copy = tmp_path / "urza"
    shutil.copytree(grow_urza.path.parent, copy)
    with Urza(copy / "urza.db") as urza:
        urza.update(grow_urza.training_id, status="rejected")  # type: ignore[arg-type]
    done, fig = figures(copy / "urza.db", tmp_path / "grow.json")
    assert fig["training_route"] == "eager"
    assert "training route: eager" in done.stdout and "the seeds train eager" in done.stdout
    assert all(calls.get("compiled", 0) == 0 for calls in fig["seed_calls"])


def test_without_an_urza_the_example_says_how_to_certify(tmp_path: Path) -> None:
    done = run_example("--urza", str(tmp_path / "missing.db"), "--steps", "20")
    assert done.returncode == 2
    assert "pytest --certify -k residual_mlp" in done.stderr


# -- lockstep: each step of Kasmina's seeds from an independent eager oracle's state --------------------------


class Disagreement(AssertionError):
    """Kasmina's seeds left the eager oracle by more than the certified tolerance."""


def step_tolerance(tol: Tolerance, eager: Any, references: Sequence[Any]) -> Tolerance:
    """The blueprint's tolerance, atol widened as certification's gradient rule does
    (:func:`esper.numerics.gradients.tolerance`) by how far eager moves when only its rounding changes: the same
    step in float64, and in float32 with the batch's rows reversed."""
    return Tolerance(max(tolerance(tol.atol, tol.rtol, eager, ref)[0] for ref in references), tol.rtol)


def ambiguous(logits: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """Rows whose top-2 logit margin is within two tolerances: the only rows whose prediction may differ."""
    top = logits.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) <= 2 * (tol.atol + tol.rtol * top[:, 0].abs())


def check_predictions(compiled: torch.Tensor, eager: torch.Tensor, tol: Tolerance, where: str) -> None:
    unexplained = (compiled.argmax(1) != eager.argmax(1)) & ~ambiguous(eager, tol)
    if unexplained.any():
        rows = unexplained.nonzero().flatten().tolist()[:5]
        raise Disagreement(f"{where}: predictions differ on rows {rows} whose eager logit margin exceeds {tol}")


def check_step(step: int, compiled: Any, eager: Any, references: Sequence[Any], tol: Tolerance) -> float:
    """One step of both runs from the same state: the loss within ``atol + rtol * |loss|`` at the step's
    tolerance, the batch's predictions equal but for near ties; the loss difference as a fraction of its bound."""
    loss_tol = step_tolerance(tol, torch.tensor(eager.loss), [torch.tensor(r.loss) for r in references])
    diff, bound = abs(compiled.loss - eager.loss), loss_tol.atol + loss_tol.rtol * abs(eager.loss)
    if diff > bound:
        raise Disagreement(
            f"step {step}: loss {compiled.loss:.7f} (Kasmina's seeds) vs {eager.loss:.7f} (eager), "
            f"difference {diff:.2e} > {bound:.2e}"
        )
    logits_tol = step_tolerance(tol, eager.logits, [r.logits for r in references])
    check_predictions(compiled.logits, eager.logits, logits_tol, f"step {step}, training batch")
    return diff / bound


def check_paths(step: int, grower: Any) -> None:
    """Every live seed's last training call ran compiled code while its weights train, eager once they are
    frozen (a fossil: only its input's gradient is wanted, which eager computes alone)."""
    seeds = [s.seed for s in grower.host.slots if s.seed is not None]
    paths = [getattr(seed, "last_path", None) for seed in seeds]
    want = [COMPILED if any(p.requires_grad for p in seed_module(seed).parameters()) else EAGER for seed in seeds]
    if paths != want:
        raise Disagreement(f"step {step}: the seeds' training calls ran {paths}, not {want}")


def oracle(
    grow: ModuleType, bp: Blueprint, weights: Any, dtype: torch.dtype = torch.float32, nudge: float = 0.0
) -> Any:
    """An eager run of the example's loop whose seeds are the catalog blueprint's own module in ``dtype``;
    ``nudge`` adds to every seed weight (a seeded defect)."""
    width = bp.inputs[0].shape[1]
    run = grow.Grower(grow.Host(width).to(dtype), bp, weights, STEPS, None)

    def new_seed(slot: int, w: dict[str, torch.Tensor]) -> torch.nn.Module:
        module = bp.build()
        module.load_state_dict({k: v + nudge if v.is_floating_point() else v for k, v in w.items()})
        return module.to(dtype).train()

    run.new_seed = new_seed
    return run


def seed_module(seed: torch.nn.Module) -> torch.nn.Module:
    """The module holding a seed's weights: a Kasmina training kernel's ``seed``, else the module itself."""
    held = getattr(seed, "seed", None)
    return held if isinstance(held, torch.nn.Module) else seed


@torch.no_grad()
def sync(run: Any, source: Any) -> None:
    """Give ``run`` the state of ``source``: host and seed weights, every optimizer's velocities."""
    for mine, theirs in zip(run.host.slots, source.host.slots, strict=True):
        if mine.seed is not None:
            for p, q in zip(seed_module(mine.seed).parameters(), seed_module(theirs.seed).parameters(), strict=True):
                p.copy_(q)
    own = [(n, p) for n, p in run.host.named_parameters() if not n.startswith("slots.")]
    theirs = dict(source.host.named_parameters())
    for name, p in own:
        p.copy_(theirs[name])
    assert run.optimizers.keys() == source.optimizers.keys()
    for key, opt in run.optimizers.items():
        for v, w in zip(opt.velocity, source.optimizers[key].velocity, strict=True):
            v.copy_(w)


def lockstep(grow: ModuleType, bp: Blueprint, make_run: Any, *, compiled: bool) -> float:
    """Step the run ``make_run(weights)`` builds and the eager oracle (with its two rounding references) on the
    same batches, ``run`` synced to the oracle before each step; raise :class:`Disagreement` at the first step
    or validation prediction outside the tolerance. Returns the largest fraction of a step's bound used."""
    batches, val_x, _ = grow.digits(BATCH, STEPS)
    weights = [grow.seed_weights(bp, k) for k in range(grow.N_SLOTS)]
    run, eager = make_run(weights), oracle(grow, bp, weights)
    float64, reversed_rows = oracle(grow, bp, weights, torch.float64), oracle(grow, bp, weights)
    used = 0.0
    for step, (x, y) in enumerate(batches):
        sync(run, eager)
        mine, ref = run.step(step, x, y), eager.step(step, x, y)
        wide = float64.step(step, x.double(), y)
        flipped = reversed_rows.step(step, x.flip(0), y.flip(0))
        references = [wide, grow.StepRecord(flipped.loss, flipped.logits.flip(0), 0.0, 0.0)]
        used = max(used, check_step(step, mine, ref, references, bp.tolerance))
        if compiled:
            check_paths(step, run)
    val = [grow.evaluate(r.host, v, BATCH) for r, v in ((run, val_x), (eager, val_x), (float64, val_x.double()))]
    check_predictions(val[0], val[1], step_tolerance(bp.tolerance, val[1], val[2:]), "validation")
    return used


@pytest.mark.compiles
def test_kasmina_seeds_agree_with_an_independent_eager_oracle_at_every_step(grow_urza: GrowUrza) -> None:
    pytest.importorskip("sklearn")
    from esper.kasmina import Kasmina

    grow, bp = example(), tiny_residual()
    kasmina = Kasmina(grow_urza.path, blueprint_paths=[GROW])
    width = bp.inputs[0].shape[1]
    used = lockstep(grow, bp, lambda w: grow.Grower(grow.Host(width), bp, w, STEPS, kasmina), compiled=True)
    assert 0 <= used <= 1


def test_the_lockstep_catches_a_seed_whose_weights_are_off_and_passes_its_clean_twin() -> None:
    pytest.importorskip("sklearn")
    grow, bp = example(), tiny_residual()
    assert lockstep(grow, bp, lambda w: oracle(grow, bp, w), compiled=False) == 0.0
    with pytest.raises(Disagreement, match=r"step \d+"):
        lockstep(grow, bp, lambda w: oracle(grow, bp, w, nudge=1e-3), compiled=False)


def record(grow: ModuleType, loss: float, logits: list[list[float]]) -> Any:
    return grow.StepRecord(loss, torch.tensor(logits), 0.0, 0.0)


def test_a_loss_beyond_the_tolerance_is_a_disagreement() -> None:
    grow = example()
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    logits = [[2.0, 0.0], [0.0, 3.0]]
    exact = record(grow, 1.0, logits)
    used = check_step(0, record(grow, 1.0001, logits), record(grow, 1.0, logits), [exact], tol)
    assert 0.4 < used < 0.6  # 1e-4 of a 2e-4 bound
    with pytest.raises(Disagreement, match=r"step 7: loss 1\.0003000"):
        check_step(7, record(grow, 1.0003, logits), record(grow, 1.0, logits), [exact], tol)


def test_the_bound_widens_by_the_slack_times_eager_own_rounding_drift() -> None:
    grow = example()
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    logits = [[2.0, 0.0]]
    eager = record(grow, 1.0, logits)
    # Eager's references: float64 moved 1e-5, reversed rows 2e-6: the larger one counts.
    references = [record(grow, 1.00001, logits), record(grow, 0.999998, logits)]
    # Bound: atol 1e-4 + 32 x 1e-5, plus rtol 1e-4 x 1.0 = 5.2e-4: a 3e-4 difference is within, 6e-4 is not.
    check_step(0, record(grow, 1.0003, logits), eager, references, tol)
    with pytest.raises(Disagreement, match="step 1"):
        check_step(1, record(grow, 1.0006, logits), eager, references, tol)


def test_a_prediction_may_differ_only_where_eager_is_within_the_tolerance_of_a_tie() -> None:
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    eager = torch.tensor([[1.0, 1.00005], [0.0, 3.0]])
    check_predictions(torch.tensor([[1.00006, 1.0], [0.0, 3.0]]), eager, tol, "near tie")
    with pytest.raises(Disagreement, match=r"rows \[1\]"):
        check_predictions(torch.tensor([[1.0, 1.00005], [3.0, 0.0]]), eager, tol, "clear case")


def test_seeds_germinate_overlap_ramp_and_fossilize_on_the_schedule() -> None:
    pytest.importorskip("sklearn")
    grow, bp = example(), tiny_residual()
    run = oracle(grow, bp, [grow.seed_weights(bp, k) for k in range(grow.N_SLOTS)])
    run_steps = 100  # the oracle's schedule is for STEPS; a fresh one for 100 steps reads more easily
    run = grow.Grower(grow.Host(32), bp, run.weights, run_steps, None)
    assert run.germinate_at == [25, 35, 45] and run.ramp == 10 and run.train_for == 35
    batches, _, _ = grow.digits(BATCH, run_steps)
    alphas, trainable = [], []
    for step, (x, y) in enumerate(batches):
        run.step(step, x, y)
        alphas.append([s.alpha for s in run.host.slots])
        trainable.append(sorted(k for k in run.optimizers if k != "host"))
    assert [a[0] for a in (alphas[24], alphas[25], alphas[29], alphas[34], alphas[90])] == [0.0, 0.1, 0.5, 1.0, 1.0]
    assert trainable[50] == ["seed 0", "seed 1", "seed 2"]  # all three train at once
    assert "seed 0" in trainable[59] and "seed 0" not in trainable[60]  # fossilized 35 steps after germination
    assert all(not p.requires_grad for p in run.host.slots[0].seed.parameters())


def test_batches_keep_one_shape_and_the_data_order_is_fixed() -> None:
    pytest.importorskip("sklearn")
    grow = example()
    (a, val_x, val_y), (b, _, _) = grow.digits(32, 7), grow.digits(32, 7)
    assert [x.shape for x, _ in a] == [torch.Size([32, 64])] * 7 and len(val_x) == len(val_y) == 359
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_hugging_face_blueprints_declare_cleanly_and_the_host_seeds_fit_it() -> None:
    pytest.importorskip("transformers")
    grow = example()
    catalog = load_catalog([ROOT / "examples" / "hf_blueprints"])  # strict: the first declaration error raises
    host_seeds = ["hf_gpt2_mlp", "hf_llama_mlp", "hf_llama_rmsnorm"]
    assert sorted(catalog.blueprints) == [
        "hf_bert_output",
        "hf_gpt2_mlp",
        "hf_llama_attention",
        "hf_llama_mlp",
        "hf_llama_rmsnorm",
    ]
    for bp in catalog.blueprints.values():
        if bp.name in host_seeds:
            batch, width = grow.seed_input(bp)
            assert (batch.min, batch.max, width) == (1, 64, 256), bp.name
        else:  # sequence seeds, (batch, seq, hidden): a slot of the host cannot feed them, and grow.py says so
            with pytest.raises(SystemExit, match=bp.name):
                grow.seed_input(bp)
        # Every one returns its (last) input's shape, at a representative shape and at one token.
        for sizes in (bp.representative[0], {n: d.min for n, d in bp.dims.items()}):
            args = [torch.randn(s) for s in bp.shapes(sizes).values()]
            with torch.no_grad():
                assert bp.build()(*args).shape == args[-1].shape, (bp.name, sizes)
