"""examples/hf_blueprints' ``hf_llama_attention`` (transformers' LlamaAttention with its pre-norm, rotary
embedding and causal mask) certified end to end, as a fresh project declaring that folder certifies it.

Skipped where transformers is not importable. One ``esper certify`` run (one shape profile; its inference
variants and its training artifact, a few minutes): every candidate is certified. Its inference package reads
``positions``, a non-persistent buffer no state dict holds, so the ``weights`` check binding a seed's weights
holds that the row records it and the seed hands its own (else Kasmina runs eager for seeds and the check
rejects the candidate). Latency checks may fail on a loaded machine: the test allows them, and no other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.certification.results import Check
from esper.certification.run import SELECTION
from esper.cli import cli
from esper.urza import Urza

pytestmark = pytest.mark.compiles

HF_BLUEPRINTS = Path(__file__).parent.parent.parent / "examples" / "hf_blueprints"
NAME = "hf_llama_attention"
# What a shared machine's load may decide against a candidate, after every correctness check passed: its
# latency figures, or another variant routed in its place.
TIMING = {Check.LATENCY, Check.REGIONS, Check.SELECT, Check.BUDGETS, SELECTION}


def test_hf_llama_attention_certifies_for_inference_and_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inductor_cache: Path
) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "scratch"\nversion = "0"\n\n[tool.esper]\nblueprint-paths = ["{HF_BLUEPRINTS}"]\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESPER_CERTIFY_TRAINING", "1")  # the suite turns training certification off by default
    urza = tmp_path / "urza.db"
    result = CliRunner().invoke(cli, ["certify", NAME, "--urza", str(urza)])
    with Urza(urza, readonly=True) as db:
        entries = db.entries(NAME)
    outcome = {(e.artifact, e.variant): (e.status, e.failed_check, e.failure_reason) for e in entries}
    assert {("inference", "default"), ("training", "default")} <= set(outcome), (result.output, outcome)
    # Every correctness check passes on every candidate; only a timing check may fail on a loaded machine.
    for status, failed, _ in outcome.values():
        assert status == "certified" or failed in TIMING, (result.output, outcome)
    assert all(e.engine == "aoti" for e in entries), outcome
    assert any(e.status == "certified" for e in entries if e.artifact == "inference"), outcome
    default = next(e for e in entries if (e.artifact, e.variant) == ("inference", "default"))
    assert default.meta["constants"]["positions"] == {"shape": [128], "dtype": "int64"}
