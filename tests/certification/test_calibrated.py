"""The calibrated yardstick in certification (esper.certification.kinds.KindChecks.spread_of, the conditioning
tally of esper.certification.run) and its record in Urza's evidence, without compiling: the "compiled" results
are built by hand. Oracle: judge's own verdicts and the float64 step."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from esper.certification.contract import WeightChange, weight_sets
from esper.certification.kinds import TrainingChecks
from esper.certification.run import ConditioningTally, ContractTally, conditioning_of
from esper.numerics.executions import Conditioning, calibratable, calibrate
from esper.numerics.parity import REDUCTION, judge
from esper.urza.evidence import CertifiedParity, Parity, PartConditioning
from esper.urza.evidence import Conditioning as Recorded
from tests.support import training_catalog


def _checks(tmp_path: Path) -> TrainingChecks:
    return TrainingChecks(training_catalog().get("tiny_bn"), tmp_path / "urza.db")


def _outliers(checks: TrainingChecks) -> dict[str, torch.Tensor]:
    (ws,) = weight_sets(checks.built().state_dict(), 0, (WeightChange.OUTLIERS,))
    return dict(ws.state)


def test_a_training_spread_runs_the_whole_step_on_the_seed_holding_the_weights(tmp_path: Path) -> None:
    checks = _checks(tmp_path)
    args = [torch.randn(2, 8, generator=torch.Generator().manual_seed(0))]
    state = _outliers(checks)
    expected = checks.expected_with(checks.seed(state), args, 0)
    s = checks.spread_of(args, expected, 0, state)
    # The parts and names judge gives the step's verdicts (parts judged by name in eager's order).
    verdicts = checks.judge_parts(expected.eager, expected)
    judged = {o.name for v in verdicts.values() for o in v.outputs}
    assert {o.name for o in s.outputs} <= judged and any(n.startswith("gradient[") for n in judged)
    assert {o.name for o in s.outputs} >= {n for n in judged if n.startswith(("gradient", "buffer"))}
    # The spread ran on the seed's weights: its canonical execution is eager's step with them, bit for bit.
    eager = {o.name: o.canonical_rmse for o in s.outputs}
    for v in verdicts.values():
        for o in v.outputs:
            if o.name in eager:
                assert eager[o.name] == o.rmse_eager, o.name
    # Another seed's weights give another spread.
    other = checks.spread_of(args, checks.expected(args, 0), 0)
    assert [o.canonical_rmse for o in other.outputs] != [o.canonical_rmse for o in s.outputs]


def test_the_conditioning_of_rejudged_cases_is_recorded_in_the_evidence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU()).train()
    checks = _checks(tmp_path)
    checks.reference = lambda: copy.deepcopy(module)  # type: ignore[method-assign]  # an ill-conditioned module
    args = [1e3 + torch.randn(16, 16, generator=torch.Generator().manual_seed(0))]
    expected = checks.expected(args, 0)
    s = checks.spread_of(args, expected, 0)
    (weight,) = s.part("gradient['0.weight']").outputs
    m = 3.0 * REDUCTION  # judge's rule for 512 float32 elements, times the gradients' reduction factor
    target = min(1.1 * m * weight.canonical_rmse, 0.9 * m * weight.rmse_max)
    f = expected.exact["gradient"]["0.weight"]
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = {**expected.eager, "gradient": {**expected.eager["gradient"]}}
    got["gradient"]["0.weight"] = (f + noise * target / noise.pow(2).mean().sqrt()).float()
    verdicts = {
        part: judge(got[part], expected.eager[part], expected.exact[part], atol=1e-3, rtol=1e-3, label=part,
                    reduction=1.0 if part == "output" else REDUCTION)
        for part in expected.eager
    }  # fmt: skip
    assert calibratable(verdicts)
    tallies: dict[str, ConditioningTally] = {}
    conditioning_of(tallies, calibrate(verdicts, s))
    conditioning_of(tallies, calibrate(verdicts, s))
    contract = ContractTally(cases=7, tensors=40, breaches={})
    parity = CertifiedParity(
        cases=2, conditioning={k: t.record() for k, t in tallies.items()}, contract=contract.record()
    )
    stored = json.loads(json.dumps(Parity(certify=parity).to_json()))
    raw = stored["certify"]["conditioning"]["gradient"]
    assert (raw["rejudged"], raw["admitted"], raw["conditioning"]) == (2, 2, "ill-conditioned")
    assert raw["disagreement_ulps"] > 1000
    assert stored["certify"]["contract"] == {"cases": 7, "tensors": 40, "breaches": {}}
    read = Parity.from_json(stored).certify
    assert read == parity and read is not None and read.ill_conditioned() == ("gradient",)
    assert read.conditioning["gradient"] == PartConditioning(
        2, 2, tallies["gradient"].spread_ratio, tallies["gradient"].disagreement_ulps, Recorded.ILL
    )
    assert str(tallies["gradient"].conditioning) == str(Conditioning.ILL)
