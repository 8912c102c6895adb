"""Does a compile worker pay? A blueprint's candidates compiled one after another in this process, against the
same compiles split between this process and one worker (esper.certification.compile_ahead), alternating.

    .venv/bin/python -m benchmarks.compile_workers [--blueprint NAME] [--trials N]

Every trial is cold: a fresh Urza and Inductor cache in a temporary folder. The candidates are those a
certification plans (not its exact-size specializations: they compile only where their profile fell back).
Prints the wall seconds of each trial and the median of each mode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def trial(source: Path, name: str, parallel: bool) -> float:
    from esper.artifacts.kinds import ArtifactKind
    from esper.catalog import load_file
    from esper.certification import plan
    from esper.certification.compile_ahead import CompileAhead, CompileJob, CompilePool, compile_job
    from esper.profiles import is_specialization

    [bp] = [b for b in load_file(source) if b.name == name]
    with tempfile.TemporaryDirectory(prefix="compile-workers-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor-cache")
        urza = str(Path(tmp) / "urza.db")
        jobs = []
        for artifact in ArtifactKind:
            for cid in plan.candidate_ids(bp, artifact):
                profile, variant = cid.split("/")
                # As a certification's plan: an exact-size specialization compiles only where its profile fell
                # back, which no plan knows ahead (Tezzeret refuses the others: NotSpecialized).
                if not is_specialization(profile):
                    jobs.append(CompileJob(str(source), name, artifact.value, profile, variant, urza, "cpu"))
        pool = CompilePool(1)
        try:
            if parallel:  # start the worker (it imports torch and Inductor) before the clock starts
                warm = CompileJob(str(Path(tmp) / "none.py"), name, "inference", "default", "default", urza, "cpu")
                with contextlib.suppress(RuntimeError):
                    pool.submit(warm).result()
            t0 = time.perf_counter()
            ahead = CompileAhead.start(jobs, pool) if parallel else None
            for job in jobs:
                if ahead is not None:
                    ahead.claim(job)
                compile_job(job)  # reuses what the worker stored
            return time.perf_counter() - t0
        finally:
            pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_workers")
    parser.add_argument("--blueprint", default="residual_mlp")
    parser.add_argument("--trials", type=int, default=2)
    opts = parser.parse_args(argv)
    source = ROOT / "blueprints" / f"{opts.blueprint}.py"
    times: dict[str, list[float]] = {"serial": [], "worker": []}
    for _ in range(opts.trials):
        for mode in ("serial", "worker"):
            seconds = trial(source, opts.blueprint, mode == "worker")
            times[mode].append(seconds)
            print(f"{mode}: {seconds:.1f} s", flush=True)
    for mode, ts in times.items():
        print(f"{mode}: median {statistics.median(ts):.1f} s over {len(ts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
