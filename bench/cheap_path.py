"""The cheap path's step cost against SGD and SAM, in one run (a benchmark script, not a test).

For each model (bench/step_overhead.py's ``cnn``: 3 x conv3x3 + BatchNorm + ReLU, 24k parameters, batch 64; and
``mlp``: 10 Linear layers of width 256, 594k parameters, batch 128; synthetic tensors, SGD with momentum,
cross-entropy) it times the training step of:

==========  =========================================================================================
sgd         no SAM: one forward/backward + ``optimizer.step()``
sam         ``variant="sam"`` (rho 0.05): two forward/backward every step
sam_i<k>    ``variant="sam", interval=k``: a SAM step every ``k``-th step, plain steps in between
looksam     ``variant="looksam", k=k`` (rho 0.05, alpha 0.7): a SAM step every ``k``-th step, the other steps
            reuse the kept orthogonal component ``g_v`` (one pass, two foreach passes over ``g_v``)
ssam        ``variant="ssam"`` with its defaults (Fisher mask, sparsity 0.5), for reference
fsam        ``variant="fsam"`` with its defaults, for reference
xsam        ``variant="xsam"`` with its defaults (rho 0.15, steps 1), for reference
==========  =========================================================================================

each through two harnesses:

* ``lightning``: ``Trainer.fit`` of the network as a LightningModule with ``callbacks=[SAMCallback(...)]`` (none for
  sgd). A step is timed by a callback (first in the list) from ``on_train_batch_start`` to ``on_train_batch_end``,
  as in ``bench/step_overhead.py``. The same callback asks the SAM callback's engine, before the step, whether the
  step will run pass 2, and the script checks that the timed SAM steps are exactly the first step of each cycle.
* ``engine``: a plain PyTorch loop with ``SAMEngine`` (pass 1; ``needs_second_pass()`` ? ascend, pass 2, descend :
  ``plain_step()``; ``optimizer.step()``).

Steady state: SSAM's Fisher mask is built before the timed steps (engine: before the warm-up, with its refresh
period set past the run; Lightning: the callback's only Fisher pass of the fit, one fit being one epoch, runs in
the warm-up steps). XSAM's alpha search (21 forward-only probes) runs once, on step 0, a warm-up step, in both
harnesses; afterwards it keeps the alpha it found (if that alpha is not 1 its explicit descent direction is built
every step). Its search cost is in ``bench/xsam_overhead.py``.

**Averaging over whole cycles.** The cheap rows alternate one SAM step with ``k - 1`` one-pass steps, so a median
step would report the cheap step alone. The warm-up is a whole number of cycles (``--warmup-cycles``) and the timed
steps are ``--steps`` rounded up to a multiple of ``k``, so timing starts on a SAM step; the timed steps are cut
into consecutive cycles of ``k`` steps, a run's value is the median over its cycles of the cycle's mean step time,
and the reported value is the median over ``--repeats`` runs (min..max of the run values in brackets). Every row is
averaged the same way, so ``sgd`` and ``sam`` are comparable to the cycled rows. For the cycled rows the script
also prints the median SAM step and the median cheap step, and the "mix" ``((k - 1) * sgd + sam) / k``: the cost
of a cycle made of this harness's own SGD and SAM steps; ``row / mix`` above 1 is what the cheap steps cost beyond
a plain SGD step (LookSAM's foreach passes over ``g_v``, the callback's bookkeeping).

Noise handling as in ``bench/step_overhead.py``: the rows are interleaved (each repeat runs every row once, per
model), a priming pass runs every row once before any timing, and every step is timed on two clocks, wall
(``perf_counter``) and process CPU time (``process_time``). With one torch thread (``--threads``, default 1) CPU
time is the step's own work and leaves out time spent waiting for a core: it is the clock to trust on a shared
machine. The ratios are per harness (``lightning`` rows against ``lightning`` sgd and sam, ``engine`` against
``engine``).

Usage::

    python bench/cheap_path.py                                   # defaults: cnn,mlp, k=5, CPU, ~4-6 min on 2 cores
    python bench/cheap_path.py --steps 30 --repeats 5 --json cheap_path.json
    python bench/cheap_path.py --models mlp --methods sgd,sam,sam_i5,looksam --harnesses lightning
    python bench/cheap_path.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared models, batches, LightningModule and Trainer of bench/
from timing import StepTimes as Run  # per-step times of one run; ``values``: whether each timed step ran pass 2

from lightning_sam import SAMCallback, SAMEngine

HARNESSES = ("lightning", "engine")
REFERENCE_METHODS = ("ssam", "fsam", "xsam")
CLOCKS = timing.CLOCKS
MODELS = {name: wl.MODELS[name] for name in ("cnn", "mlp")}


# ---------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    name: str
    variant: str | None  # None: plain SGD
    interval: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    cycled: bool = False  # SAM steps and one-pass steps alternate with period k


def make_methods(k: int) -> dict[str, Method]:
    methods = [
        Method("sgd", None),
        Method("sam", "sam"),
        Method(f"sam_i{k}", "sam", interval=k, cycled=True),
        Method("looksam", "looksam", options=(("k", k),), cycled=True),
        *(Method(v, v) for v in REFERENCE_METHODS),
    ]
    return {m.name: m for m in methods}


# ---------------------------------------------------------------------------------------------------- runs


def engine_loop_step(method: Method, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], bool]:
    """One training step of ``method`` in a plain loop; the closure returns whether pass 2 ran."""
    x, y = batch
    optimizer = wl.make_optimizer(model.parameters())

    def loss() -> Tensor:
        return F.cross_entropy(model(x), y)

    if method.variant is None:

        def sgd_step() -> bool:
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
            return False

        return sgd_step

    options = dict(method.options)
    if method.variant == "ssam":
        options.setdefault("mask_every", wl.NEVER)  # steady-state steps only: no refresh inside a run
    engine = SAMEngine(model.named_parameters(), method.variant, interval=method.interval, **options)
    if engine.samples_needed():  # SSAM: the mask exists before the first (warm-up) step
        wl.build_fisher_mask(engine, model, batch)

    def step() -> bool:
        optimizer.zero_grad()
        loss().backward()
        second = engine.needs_second_pass()
        if second:
            engine.ascend()
            optimizer.zero_grad()
            loss().backward()
            engine.descend(evaluate=loss)  # XSAM's alpha search probes with it (descend runs under no_grad)
        else:
            engine.plain_step()
        optimizer.step()
        return second

    return step


def run_engine(
    method: Method, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> Run:
    return timing.time_loop(engine_loop_step(method, wl.make_model(spec, device).train(), batch), warmup, steps, device)


def run_lightning(
    method: Method, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> Run:
    """Timed by a callback first in the list, which also asks the SAM callback's engine, before the SAM callback's
    own batch-start hook, whether it plans pass 2 for the step."""
    total = warmup + steps
    module = wl.BenchModule(wl.make_model(spec, device))
    sam = None
    if method.variant is not None:
        sam = SAMCallback(variant=method.variant, interval=method.interval, **dict(method.options))

    def plans_second_pass() -> bool:
        engine = sam.engine if sam is not None else None
        return bool(engine is not None and engine.needs_second_pass())

    timer = timing.LightningTimer(timing.synchronizer(device), probe=plans_second_pass)
    trainer = wl.make_trainer(device, total, [timer] + ([sam] if sam is not None else []))
    loader = DataLoader(wl.SameBatch(batch, total), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if len(timer.ends) != total:
        raise RuntimeError(f"{method.name}: expected {total} steps, timed {len(timer.ends)}")
    return timer.step_times(warmup, total, cycles=False)  # on_train_batch_start to on_train_batch_end


def run_row(
    harness: str,
    method: Method,
    spec: wl.ModelSpec,
    device: torch.device,
    warmup: int,
    steps: int,
    batch: tuple[Tensor, Tensor],
) -> Run:
    runner = run_lightning if harness == "lightning" else run_engine
    return runner(method, spec, device, warmup, steps, batch)


def check_schedule(row: str, method: Method, run: Run, k: int) -> None:
    """The timed steps with pass 2 must be the first of each cycle (cycled rows) or every step (the others)."""
    if method.variant is None:
        expected = [False] * len(run.values)
    elif method.cycled:
        expected = [i % k == 0 for i in range(len(run.values))]
    else:
        expected = [True] * len(run.values)
    if run.values != expected:
        pattern = "".join("S" if s else "." for s in run.values)
        raise RuntimeError(f"{row}: unexpected pass-2 schedule in the timed steps: {pattern}")


# ---------------------------------------------------------------------------------------------------- statistics


def summarize(runs: list[Run], method: Method, k: int) -> dict[str, Any]:
    """Per clock: the cycle-averaged step (median over cycles, then over runs); for cycled rows also the median SAM
    step and the median cheap step."""
    out: dict[str, Any] = {}
    for clock in CLOCKS:
        per_run = [r.get(clock) for r in runs]
        out[clock] = timing.spread([statistics.median(timing.cycle_means(t, k)) for t in per_run])
        if method.cycled:
            out[f"{clock}_sam_step"] = timing.spread([statistics.median(t[0::k]) for t in per_run])
            out[f"{clock}_cheap_step"] = timing.spread(
                [statistics.median([v for i, v in enumerate(t) if i % k]) for t in per_run]
            )
    return out


def ratios(summary: dict[str, dict[str, Any]], methods: dict[str, Method], k: int) -> dict[str, dict[str, float]]:
    """Per clock and row: ``/sgd``, ``/sam`` and, for cycled rows, ``/mix`` with mix = ((k-1) sgd + sam) / k."""
    out: dict[str, dict[str, float]] = {}
    for clock in CLOCKS:
        sgd = summary["sgd"][clock]["ms"] if "sgd" in summary else None
        sam = summary["sam"][clock]["ms"] if "sam" in summary else None
        table: dict[str, float] = {}
        for name, stats in summary.items():
            value = stats[clock]["ms"]
            if sgd and name != "sgd":
                table[f"{name}/sgd"] = value / sgd
            if sam and name not in ("sgd", "sam"):
                table[f"{name}/sam"] = value / sam
            if sgd and sam and methods[name].cycled:
                table[f"{name}/mix"] = value / (((k - 1) * sgd + sam) / k)
        out[clock] = table
    return out


def print_report(results: dict[str, Any], methods: dict[str, Method], harnesses: list[str], k: int) -> None:
    models = list(results)
    names = [m for m in methods if m in results[models[0]]["rows"][harnesses[0]]]
    fmt = timing.fmt_spread
    for harness in harnesses:
        print(f"\n### {harness}: ms per step, averaged over whole {k}-step cycles, median (min..max) of the runs\n")
        header = ["method"] + [f"{x} {c}" for x in models for c in CLOCKS]
        rows = [[n] + [fmt(results[x]["rows"][harness][n][c]) for x in models for c in CLOCKS] for n in names]
        print(timing.md_table(header, rows))
        cycled = [n for n in names if methods[n].cycled]
        if cycled:
            print(f"\n{harness}, cycled rows: the SAM step and the cheap step alone (median step), ms\n")
            header = ["method", "step"] + [f"{x} {c}" for x in models for c in CLOCKS]
            rows = [
                [n, kind] + [fmt(results[x]["rows"][harness][n][f"{c}_{kind}_step"]) for x in models for c in CLOCKS]
                for n in cycled
                for kind in ("sam", "cheap")
            ]
            print(timing.md_table(header, rows))
        ratio_names = list(results[models[0]]["ratios"][harness]["cpu"])
        print(f"\n{harness}: ratios of the cycle-averaged steps (wall / cpu)\n")
        rows = timing.ratio_rows(ratio_names, models, lambda x, c, r, h=harness: results[x]["ratios"][h][c][r], CLOCKS)
        print(timing.md_table(["ratio", *models], rows))


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5, help="the interval of sam_i<k> and LookSAM's k (default 5)")
    timing.add_common_args(parser, MODELS, warmup=None)  # --steps: rounded up to a multiple of k
    parser.add_argument("--warmup-cycles", type=int, default=2, help="untimed k-step cycles before each run (2)")
    parser.add_argument("--methods", default="all", help="comma-separated subset of the rows, or 'all' (default)")
    parser.add_argument("--harnesses", default=",".join(HARNESSES), help="lightning,engine (default: both)")
    args = parser.parse_args(argv)
    k = args.k
    if k < 2:
        parser.error("--k must be >= 2")
    if args.warmup_cycles < 1:
        parser.error("--warmup-cycles must be >= 1 (XSAM's search and SSAM's Fisher pass run in the warm-up)")
    steps = -(-max(args.steps, k) // k) * k
    warmup = args.warmup_cycles * k
    all_methods = make_methods(k)
    names = list(all_methods) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(all_methods))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(all_methods)}")
    methods = {n: all_methods[n] for n in all_methods if n in names}
    harnesses = [h for h in args.harnesses.split(",") if h]
    if not harnesses or set(harnesses) - set(HARNESSES):
        parser.error(f"--harnesses: a comma-separated subset of {HARNESSES}")

    timing.quiet()
    device = timing.setup(args.threads, args.device)
    env = timing.environment(device, k=k, steps=steps, warmup=warmup, repeats=args.repeats)
    timing.print_env(env)
    rows = [(h, m.name) for h in harnesses for m in methods.values()]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for spec in (MODELS[x] for x in args.models.split(",")):
        batch = wl.make_batch(spec, device)

        def run(row: tuple[str, str], spec: wl.ModelSpec = spec, batch: Any = batch) -> Run:
            harness, name = row
            result = run_row(harness, methods[name], spec, device, warmup, steps, batch)
            check_schedule(f"{spec.name} {harness}/{name}", methods[name], result, k)
            return result

        def prime(row: tuple[str, str], spec: wl.ModelSpec = spec, batch: Any = batch) -> Run:
            return run_row(row[0], methods[row[1]], spec, device, warmup, k, batch)

        def progress(last: dict[tuple[str, str], Run]) -> str:
            return "cpu ms/step: " + ", ".join(
                f"{h[0]}/{n} {statistics.median(timing.cycle_means(r.cpu_s, k)) * 1e3:.1f}"
                for (h, n), r in last.items()
            )

        runs = timing.interleave(rows, run, args.repeats, prime=prime, label=spec.name, report=progress)
        model_result: dict[str, Any] = {"description": spec.description, "rows": {}, "ratios": {}}
        for harness in harnesses:
            summary = {m.name: summarize(runs[harness, m.name], m, k) for m in methods.values()}
            model_result["rows"][harness] = summary
            model_result["ratios"][harness] = ratios(summary, methods, k)
        results[spec.name] = model_result
    elapsed = time.perf_counter() - started
    print_report(results, methods, harnesses, k)
    return timing.finish(env, elapsed, results, args.json)


if __name__ == "__main__":
    main()
