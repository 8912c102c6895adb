"""The floor: what the raw AOTInductor runner costs per call, and Kasmina's own overhead above it.

    .venv/bin/python -m benchmarks.floor [--urza PATH] [--catalog DIR] [--blueprint NAME ...] [--rounds N]
        [--number N] [--json PATH]

Per blueprint with a certified compiled route in ``--urza`` (default ``.esper/bench/urza.db``, which
``pytest benchmarks`` fills), at its smallest representative shape (the one where the overhead weighs most)
where the kernel serves compiled code there (a shape whose cell runs eager by evidence is skipped, and says so),
under ``torch.no_grad()``:

- ``raw``: the C++ loader's ``run`` called directly in a tight loop (``AOTIModelPackageLoader.run``, inputs
  already a list): the runner with nothing of ours around it. The loop's own cost (about 30 ns a call) is
  inside it, so the overhead below is, if anything, understated by that much.
- ``raw_timer``: the same call timed by ``torch.utils.benchmark.Timer`` (blocked autorange), as a cross-check.
- ``package``: :class:`~esper.artifacts.runtime.CompiledPackage` (lock, output unflattening).
- ``kernel``: the Kasmina kernel, ``kernel(*args)``: its hook test (standing in for ``nn.Module.__call__``),
  guard, routing, the mode and grad checks, contiguity, bookkeeping, the package's runner (lock, output).
  ``kernel_grad`` is the same call with grad mode on (the default).
- ``select``: guard + routing alone (``Kernel.select``), and ``eager`` for scale.
- ``bound``: a seed's kernel, ``Kasmina.load_seeds(name).bind(module)`` called the same way, where it routes
  compiled at that shape: what following the seed's module costs on top (its runner is a second loaded copy).
- ``raw_after_python``: the runner with a little plain Python (``python``: dict reads and tests, about as long
  as the kernel's own code) before each call. ``python_penalty_us`` = ``raw_after_python - raw - python``: the
  runner runs slower after any work between calls, a cost in every figure above ``raw`` and one no Python
  caller avoids. It is not only the interpreter's: a short C call or a 4 KB copy between calls costs it too,
  and it grows with the compiled code's parallel regions (with one thread it shrinks); a tight loop of
  ``run`` keeps the runner's OpenMP worker and caches in a state no caller with other work keeps them in.
- ``dispatch``: the kernel's generated dispatcher alone, and ``dispatch_plain`` the same routes' dispatcher
  without their route tables: the region lookup's cost is the difference (regional kernels only).
- ``guarded`` (paired blocks only, below): the kernel's dispatcher, then the runner, in the same bare loop: the
  least a guarded call runs. The overhead splits into ``guard_us`` (``guarded - raw``: the dispatcher and what
  it costs the runner after it) and ``call_us`` (``kernel - guarded``: the kernel's own code around them).

The eager floor, for every blueprint (whatever it routes): ``bare``, the blueprint's module called directly,
against ``eager_route``, a kernel serving that module eager (the loaded kernel where the shape routes eager,
else one derived from it with every route eager), interleaved at the smallest shape, three times as many rounds
as the compiled paths (a tenth of the calls each). The ratio is the median over paired blocks (below) of
``eager_route / bare``, blocks of 5 calls. The target is ``eager_route <= 1.02 x bare``.

Paths are interleaved: every round runs each path ``--number`` times in a shuffled order, and the figure is
the median of per-round per-call times with the spread (min-max of the round medians). The overhead, and its
split into guard and call, are measured apart, in paired blocks: ``raw``, ``kernel``, ``twin`` and ``guarded``
in blocks of 20 calls, in one order and then its reverse, as many calls of each in all as the rounds make; the
overhead is the median over blocks of ``kernel - raw``, with the blocks' quartiles. Two figures of one
block are microseconds apart, where two paths of one round are hundreds of calls apart and the machine
drifts between them by more than the target at a 100 us kernel (the rounds' own ``kernel - raw`` is kept
beside it as ``overhead_rounds_us``). The target is ``<= max(3 us, 5% of raw)``. ``twin`` is ``raw`` again,
on the kernel's other side (raw, kernel, twin; twin, kernel, raw): ``twin - raw`` (``twin_us``, with its
quartiles) is what the method reads where there is nothing to find, the yardstick for an overhead at a large
kernel, whose calls vary by more than a small overhead.

Each group of blocks starts with ``reference``, plain Python (:func:`python_work`) with no torch in it. On a
shared host the same Python runs about half as fast for seconds at a time (another tenant on the physical core;
no steal time is counted), and every path of a block run then is slower by that factor, their difference too.
The overhead is judged on the quiet blocks, those whose reference took at most ``QUIET_TOLERANCE`` times its
10th percentile, where at least ``QUIET_MIN_BLOCKS`` of them ran (``judged_on`` says which); the median over
every block is kept beside it as ``overhead_all_blocks_us``, and ``reference_us`` is the reference's median.

``raw``, ``kernel``, ``bare`` and ``eager_route`` are called in the same bare loop (no lambda of ours around the
call). Writes ``.esper/bench/floor.json`` (and ``floor.md``) unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGET_US = 3.0
TARGET_SHARE = 0.05
EAGER_TARGET_SHARE = 0.02
# Calls per block of the paired measurements (see adjacent): short enough that two blocks are moments apart,
# long enough that reading the clock is a small part of a block.
BLOCK = 20
EAGER_BLOCK = 5
# A block is quiet when the reference Python in it ran within this factor of its quick time (see quiet).
QUIET_TOLERANCE = 1.25
# The overhead is judged on the quiet blocks where at least this many ran (see measure_blueprint).
QUIET_MIN_BLOCKS = 20


# The clock: wall time (what a caller waits), or this thread's CPU time, which a busy machine's preemptions do
# not inflate (only for figures dominated by the calling thread, as this script's are: a small kernel's
# runner stays on it). Set by --clock.
CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}
clock = time.perf_counter_ns


def per_call_us(fn: Callable[[], Any], number: int) -> float:
    """Mean microseconds per call over ``number`` back-to-back calls."""
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number / 1e3


def raw_loop_us(run: Callable[[list[torch.Tensor]], Any], args: list[torch.Tensor], number: int) -> float:
    """The loader's ``run`` in the tightest loop Python allows (no lambda, no attribute lookups)."""
    t0 = clock()
    for _ in range(number):
        run(args)
    return (clock() - t0) / number / 1e3


def call_loop_us(fn: Callable[..., Any], args: Sequence[Any], number: int) -> float:
    """``fn(*args)`` in the same tight loop as :func:`raw_loop_us`: what a caller's own loop pays, and no
    lambda of ours counted as the kernel's overhead."""
    t0 = clock()
    for _ in range(number):
        fn(*args)
    return (clock() - t0) / number / 1e3


def python_work(table: dict[str, int]) -> int:
    """Plain Python about as long as the kernel's own code on an accepted call (dict reads and tests, no torch):
    what ``raw_after_python`` puts between two runner calls, and the reference that tells quiet blocks (see
    :func:`quiet`)."""
    n = 0
    for _ in range(4):
        if table["a"] or table["b"] or table["c"] or table["d"]:
            n += 1
        n += table["e"] + table["f"]
    return n


def raw_after_python_us(
    run: Callable[[list[torch.Tensor]], Any], args: list[torch.Tensor], table: dict[str, int], number: int
) -> float:
    """The runner with :func:`python_work` before each call, in the same loop as :func:`raw_loop_us`."""
    t0 = clock()
    for _ in range(number):
        python_work(table)
        run(args)
    return (clock() - t0) / number / 1e3


def guarded_loop_us(
    route_of: Callable[[Sequence[Any]], Any],
    run: Callable[[list[torch.Tensor]], Any],
    args: Sequence[Any],
    flat: list[torch.Tensor],
    number: int,
) -> float:
    """The kernel's dispatcher, then the runner, in the same loop as :func:`raw_loop_us`."""
    t0 = clock()
    for _ in range(number):
        route_of(args)
        run(flat)
    return (clock() - t0) / number / 1e3


def paired(
    figures: dict[str, dict[str, Any]],
    a: str,
    b: str,
    combine: Callable[[float, float], float] = operator.sub,
    keep: Sequence[bool] | None = None,
) -> dict[str, float]:
    """The median, min and max over rounds of ``combine(a, b)`` (their difference unless told), each round's two
    figures taken moments apart (see :func:`interleaved`): it cancels the machine's drift between rounds.
    ``keep``: one flag per round, the rounds to take (every one unless told; at least one must be kept)."""
    xs, ys = figures[a]["samples"], figures[b]["samples"]
    flags = [True] * len(xs) if keep is None else keep
    d = [combine(x, y) for x, y, k in zip(xs, ys, flags, strict=True) if k]
    q1, _, q3 = statistics.quantiles(d, n=4) if len(d) > 1 else (d[0], d[0], d[0])
    return {"median": statistics.median(d), "min": min(d), "max": max(d), "q1": q1, "q3": q3}


def quiet(figures: dict[str, dict[str, Any]], reference: str, tolerance: float = QUIET_TOLERANCE) -> list[bool]:
    """Which rounds or blocks ran with the machine at its own speed: those where ``reference`` (plain Python,
    :func:`python_work`, measured beside the paths) took at most ``tolerance`` times its 10th percentile.

    On a shared host the same Python takes about twice as long for seconds at a time, in a process with no
    other thread and no steal time counted (another tenant on the physical core): every path of a block run
    then is slower by that factor, and so is their difference. Judged in such blocks, an overhead is the
    neighbour's, in the slowed machine's units."""
    samples = figures[reference]["samples"]
    quick = statistics.quantiles(samples, n=10)[0] if len(samples) > 1 else samples[0]
    return [x <= tolerance * quick for x in samples]


def adjacent(
    paths: dict[str, Callable[[], float]], blocks: int, *, first: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every path once per block, in one order and then in its reverse (ABC, CBA, ABC...), each a short block
    of calls: a difference of two paths is then taken between figures microseconds apart, with the order's
    own effect cancelled, which is what a difference smaller than the machine's drift between rounds needs.
    Shaped as :func:`interleaved`'s figures (``samples`` in block order) for :func:`paired`.

    ``first``: a path run at the start of every block whatever the order (XABC, XCBA...), so that what runs
    just before it is the same kind of block in both orders. The reference that tells quiet blocks needs it:
    plain Python runs about half as fast again right after a runner's block as right after its own, so a
    reference that took turns at the end and the start of the order would call every block of one order quiet,
    and a judgement over the quiet blocks would read one order's position effect as overhead."""
    names = [n for n in paths if n != first]
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for b in range(blocks):
        for name in ([first] if first is not None else []) + (names if b % 2 == 0 else names[::-1]):
            samples[name].append(paths[name]())
    return {k: {"us": statistics.median(v), "samples": v} for k, v in samples.items()}


def interleaved(paths: dict[str, Callable[[], float]], rounds: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Run every path once per round in a shuffled order; median and spread of the per-round figures, and the
    figures themselves (``samples``, in round order: paths measured in one round can be compared pairwise)."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            samples[name].append(paths[name]())
    return {
        k: {"us": statistics.median(v), "min_us": min(v), "max_us": max(v), "rounds": len(v), "samples": v}
        for k, v in samples.items()
    }


def smallest_shape(bp: Any) -> dict[str, int]:
    """The representative shape with the fewest input elements."""
    from esper.numerics.inputs import example_inputs

    return min((dict(r) for r in bp.representative), key=lambda s: sum(a.numel() for a in example_inputs(bp, s)))


def timer_us(run: Callable[[list[torch.Tensor]], Any], args: list[torch.Tensor]) -> float:
    from torch.utils.benchmark import Timer

    m = Timer("run(args)", globals={"run": run, "args": args}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2
    )
    return m.median * 1e6


def measure_blueprint(kernel: Any, bp: Any, *, rounds: int, number: int, bound: Any = None) -> dict[str, Any]:
    from esper.artifacts.runtime import CompiledPackage
    from esper.numerics.inputs import example_inputs
    from esper.urza.evidence import COMPILED

    sizes = smallest_shape(bp)
    args = example_inputs(bp, sizes)
    route, why = kernel.select(args)
    if route is None or route.package is None:
        return {"shape": sizes, "skipped": why or "this shape routes eager"}
    with torch.no_grad():
        kernel(*args)  # a deferred route loads on its first call
    if kernel.last_path != COMPILED:
        # A route accepts the shape, but its cell there runs eager by evidence (in a shared profile: no member
        # won it): the kernel serves the module, and that route's runner would time another call.
        return {"shape": sizes, "skipped": "this shape routes eager by region (its cell of every route is eager)"}
    route, _ = kernel.select(args)
    package = route.package
    if not isinstance(package, CompiledPackage):
        return {"shape": sizes, "skipped": f"the route calls a {type(package).__name__}"}
    run = package._loader.run  # the private C++ loader, on purpose: this is the floor under our wrapper
    flat = [a.contiguous() for a in args]
    eager = bp.build().eval()
    select = kernel.select
    table = dict.fromkeys("abcdef", 0)

    def grad_kernel() -> float:
        with torch.enable_grad():
            return per_call_us(lambda: kernel(*args), number)

    route_of = kernel._call_of  # the generated dispatcher the kernel's hot path calls, on purpose
    paths: dict[str, Callable[[], float]] = {
        "raw": lambda: raw_loop_us(run, flat, number),
        "raw_after_python": lambda: raw_after_python_us(run, flat, table, number),
        "python": lambda: call_loop_us(python_work, (table,), number),
        "package": lambda: per_call_us(lambda: package(flat), number),
        "kernel": lambda: call_loop_us(kernel, args, number),
        "kernel_grad": grad_kernel,
        "select": lambda: per_call_us(lambda: select(args), number),
        "eager": lambda: per_call_us(lambda: eager(*args), max(1, number // 4)),
    }
    if bound is not None:
        with torch.no_grad():
            bound(*args)
        if bound.last_path == "compiled":
            paths["bound"] = lambda: per_call_us(lambda: bound(*args), number)
    if any(r.regional for r in kernel.routes):
        from esper.kasmina.kernel import route_dispatch

        dispatch, plain = kernel._route_of, route_dispatch([r.everywhere() for r in kernel.routes], fast=True)
        paths["dispatch"] = lambda: per_call_us(lambda: dispatch(args), number)
        paths["dispatch_plain"] = lambda: per_call_us(lambda: plain(args), number)
    with torch.no_grad():
        for fn in paths.values():
            fn()  # warm every path once
        figures = interleaved(paths, rounds)
        blocks = adjacent(
            {
                "reference": lambda: call_loop_us(python_work, (table,), BLOCK),
                "raw": lambda: raw_loop_us(run, flat, BLOCK),
                "kernel": lambda: call_loop_us(kernel, args, BLOCK),
                "twin": lambda: raw_loop_us(run, flat, BLOCK),
                "guarded": lambda: guarded_loop_us(route_of, run, args, flat, BLOCK),
            },
            max(2, rounds * number // BLOCK),
            first="reference",
        )
        raw_timer = timer_us(run, flat)
    raw = figures["raw"]["us"]
    everywhere = paired(blocks, "kernel", "raw")
    calm = quiet(blocks, "reference")
    # Judged on the quiet blocks where enough of them ran; the figure over every block is kept beside it.
    judged_quiet = sum(calm) >= QUIET_MIN_BLOCKS
    keep = calm if judged_quiet else None
    overhead = paired(blocks, "kernel", "raw", keep=keep)
    twin = paired(blocks, "twin", "raw", keep=keep)
    target = max(TARGET_US, TARGET_SHARE * raw)
    return {
        "shape": sizes,
        "paths": figures,
        "raw_timer_us": raw_timer,
        "blocks": {"count": len(blocks["raw"]["samples"]), "calls": BLOCK, "quiet": sum(calm)},
        "judged_on": "quiet blocks" if judged_quiet else "all blocks",
        "overhead_us": overhead["median"],
        "overhead_q1_us": overhead["q1"],
        "overhead_q3_us": overhead["q3"],
        "overhead_all_blocks_us": everywhere["median"],
        "reference_us": statistics.median(blocks["reference"]["samples"]),
        # The same runner measured twice (A/A): what the method reads where there is nothing to find, its bias
        # and, by its quartiles, its resolution at this kernel.
        "twin_us": twin["median"],
        "twin_q1_us": twin["q1"],
        "twin_q3_us": twin["q3"],
        # The same difference from the rounds (each path's whole round figure): drift between two paths
        # hundreds of calls apart is in it.
        "overhead_rounds_us": paired(figures, "kernel", "raw")["median"],
        "overhead_grad_us": paired(figures, "kernel_grad", "raw")["median"],
        "guard_us": paired(blocks, "guarded", "raw", keep=keep)["median"],
        "call_us": paired(blocks, "kernel", "guarded", keep=keep)["median"],
        "overhead_share": overhead["median"] / raw if raw > 0 else None,
        "target_us": target,
        "meets_target": overhead["median"] <= target,
        "routes": len(kernel.routes),
        # A seed's kernel (load_seeds().bind) pays for following its module; its own runner is another copy.
        "bound_overhead_us": paired(figures, "bound", "raw")["median"] if "bound" in figures else None,
        # What Python code between two runner calls costs beyond its own time: the runner runs slower after
        # it, a cost any Python caller pays. It grows with the runner's parallel regions (the compiled code's
        # OpenMP threads), not only with the Python's length.
        "python_penalty_us": paired(figures, "raw_after_python", "raw")["median"] - figures["python"]["us"],
        "region_lookup_us": figures["dispatch"]["us"] - figures["dispatch_plain"]["us"]
        if "dispatch" in figures
        else None,
    }


def measure_eager(kernel: Any, bp: Any, *, rounds: int, number: int) -> dict[str, Any]:
    """The eager floor at ``bp``'s smallest shape: the bare module against a kernel serving it eager."""
    from esper.numerics.inputs import example_inputs

    sizes = smallest_shape(bp)
    args = example_inputs(bp, sizes)
    with torch.no_grad():
        kernel(*args)
    served = kernel
    if kernel.last_path != "eager":  # compiled here: the same blueprint with every route eager
        served = kernel.derive(
            routes=[r.with_package(None) for r in kernel.routes], eager_factory=kernel.build_eager, reason="floor"
        )
    bare = served.eager_module()  # the very module the route calls: the comparison is the dispatch alone
    paths: dict[str, Callable[[], float]] = {
        "bare": lambda: call_loop_us(bare, args, number),
        "eager_route": lambda: call_loop_us(served, args, number),
    }
    with torch.no_grad():
        for fn in paths.values():
            fn()
        figures = interleaved(paths, rounds, seed=1)
        blocks = adjacent(
            {
                "bare": lambda: call_loop_us(bare, args, EAGER_BLOCK),
                "eager_route": lambda: call_loop_us(served, args, EAGER_BLOCK),
            },
            max(2, rounds * number // EAGER_BLOCK),
        )
    # Paired blocks: the machine's drift between rounds is, at these sizes, larger than the 2% the target allows.
    ratio = paired(blocks, "eager_route", "bare", operator.truediv)
    return {
        "shape": sizes,
        "paths": figures,
        "loaded_route": served is kernel,
        "blocks": {"count": len(blocks["bare"]["samples"]), "calls": EAGER_BLOCK},
        "ratio": ratio["median"],
        "ratio_q1": ratio["q1"],
        "ratio_q3": ratio["q3"],
        "ratio_rounds": paired(figures, "eager_route", "bare", operator.truediv)["median"],
        "meets_target": ratio["median"] <= 1 + EAGER_TARGET_SHARE,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Floor: {results['machine']}, {results.get('clock', 'wall')} clock (paths: median of {results['rounds']} "
        "interleaved rounds, [min-max] of rounds; overhead and guard + call: median of paired blocks of "
        f"{BLOCK} calls, [quartiles] of blocks, over the quiet blocks where {QUIET_MIN_BLOCKS} or more ran: see "
        "the quiet column)",
        "",
        "| blueprint | shape | raw run us | Timer us | package us | kernel us "
        "| overhead us [blocks] (all blocks; rounds; grad on) | A/A us [blocks] | target us | guard + call us "
        "| select us | eager us | bound seed us (overhead) | Python penalty us | quiet blocks (reference us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(results["blueprints"].items()):
        if "skipped" in r:
            lines.append(f"| {name} | {r['shape']} | skipped: {r['skipped']} | | | | | | | | | | | | |")
            continue
        p = r["paths"]

        def cell(k: str, p: dict[str, Any] = p) -> str:
            return f"{p[k]['us']:.2f} [{p[k]['min_us']:.2f}-{p[k]['max_us']:.2f}]"

        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        bound = f"{cell('bound')} ({r['bound_overhead_us']:.2f})" if r.get("bound_overhead_us") is not None else "-"
        lines.append(
            f"| {name} | {shape} | {cell('raw')} | {r['raw_timer_us']:.2f} | {cell('package')} | {cell('kernel')} "
            f"| {r['overhead_us']:.2f} [{r['overhead_q1_us']:.2f}-{r['overhead_q3_us']:.2f}] "
            f"({r['overhead_all_blocks_us']:.2f}; {r['overhead_rounds_us']:.2f}; {r['overhead_grad_us']:.2f}) "
            f"| {r['twin_us']:.2f} [{r['twin_q1_us']:.2f}-{r['twin_q3_us']:.2f}] "
            f"| {r['target_us']:.2f}{'' if r['meets_target'] else ' MISSED'} "
            f"| {r['guard_us']:.2f} + {r['call_us']:.2f} | {cell('select')} | {cell('eager')} | {bound} "
            f"| {r['python_penalty_us']:.2f} | {r['blocks']['quiet']} of {r['blocks']['count']} "
            f"({r['reference_us']:.2f}) |"
        )
    lines += [
        "",
        f"Eager floor: a kernel serving the module eager against the bare module (target <= {1 + EAGER_TARGET_SHARE})",
        "",
        "| blueprint | shape | bare us | eager route us | ratio [quartiles of blocks] (rounds) | route |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in sorted(results.get("eager", {}).items()):
        p = e["paths"]
        shape = ",".join(f"{k}={v}" for k, v in e["shape"].items())
        lines.append(
            f"| {name} | {shape} | {p['bare']['us']:.2f} | {p['eager_route']['us']:.2f} | {e['ratio']:.3f}"
            f" [{e['ratio_q1']:.3f}-{e['ratio_q3']:.3f}] ({e['ratio_rounds']:.3f})"
            f"{'' if e['meets_target'] else ' MISSED'} | {'loaded' if e['loaded_route'] else 'derived'} |"
        )
    return "\n".join(lines) + "\n"


def run_floor(urza: Path, catalog_dir: Path, names: list[str], *, rounds: int, number: int) -> dict[str, Any]:
    from esper.catalog import load_catalog
    from esper.kasmina import Kasmina

    catalog = load_catalog([catalog_dir])
    chosen = catalog.select(names)
    kasmina = Kasmina(urza, catalog=catalog)
    out: dict[str, Any] = {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "rounds": rounds,
        "number": number,
        "clock": "thread" if clock is time.thread_time_ns else "wall",
        "blueprints": {},
        "eager": {},
    }
    for bp in chosen:
        kernel = kasmina.load(bp.name)
        out["eager"][bp.name] = e = measure_eager(kernel, bp, rounds=3 * rounds, number=max(1, number // 10))
        print(f"{bp.name}: eager route {e['ratio']:.3f}x the bare module", flush=True)
        if kernel.route != "compiled":
            out["blueprints"][bp.name] = {"shape": smallest_shape(bp), "skipped": kernel.reason}
            continue
        bound = kasmina.load_seeds(bp.name).bind(bp.build().eval())
        out["blueprints"][bp.name] = r = measure_blueprint(kernel, bp, rounds=rounds, number=number, bound=bound)
        if "skipped" not in r:
            print(
                f"{bp.name}: raw {r['paths']['raw']['us']:.2f} us, kernel {r['paths']['kernel']['us']:.2f} us, "
                f"overhead {r['overhead_us']:.2f} us (target {r['target_us']:.2f})",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--urza", type=Path, default=ROOT / ".esper" / "bench" / "urza.db")
    parser.add_argument("--catalog", type=Path, default=ROOT / "blueprints")
    parser.add_argument("--blueprint", action="append", default=[], help="only these (repeatable)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000, help="calls per path per round")
    parser.add_argument("--json", type=Path, default=ROOT / ".esper" / "bench" / "floor.json")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this thread's CPU time (busy machine)"
    )
    a = parser.parse_args(argv)
    global clock
    clock = CLOCKS[a.clock]
    results = run_floor(a.urza, a.catalog, a.blueprint, rounds=a.rounds, number=a.number)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    a.json.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
