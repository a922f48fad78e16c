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
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # the sibling benchmark: models, batches, clocks, Trainer factory

from lightning_sam import SAMCallback, SAMEngine

HARNESSES = ("lightning", "engine")
REFERENCE_METHODS = ("ssam", "fsam", "xsam")
CLOCKS = ("wall", "cpu")


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


@dataclass
class Run:
    """Per-step times of one run (seconds) and, per timed step, whether it ran pass 2."""

    wall_s: list[float]
    cpu_s: list[float]
    second_pass: list[bool]


def engine_loop_step(method: Method, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], bool]:
    """One training step of ``method`` in a plain loop; the closure returns whether pass 2 ran."""
    x, y = batch
    optimizer = so.make_optimizer(model.parameters())

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
        options.setdefault("mask_every", so.NEVER)  # steady-state steps only: no refresh inside a run
    engine = SAMEngine(model.named_parameters(), method.variant, interval=method.interval, **options)
    if engine.samples_needed():  # SSAM: the mask exists before the first (warm-up) step
        so.build_fisher_mask(engine, model, batch)

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
    method: Method, spec: so.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> Run:
    model = so.make_model(spec, device).train()
    step = engine_loop_step(method, model, batch)
    sync = so.synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    wall, cpu, second = [], [], []
    for _ in range(steps):
        w0, c0 = so.clocks()
        two = step()
        sync()
        w1, c1 = so.clocks()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
        second.append(two)
    return Run(wall, cpu, second)


class CycleTimer(Callback):
    """Timestamps of on_train_batch_start / on_train_batch_end (first in the callback list), and whether the SAM
    callback's engine plans pass 2 for the step (asked before the SAM callback's own batch-start hook)."""

    def __init__(self, sync: Callable[[], None], sam: SAMCallback | None) -> None:
        self.sync, self.sam = sync, sam
        self.starts: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []
        self.second_pass: list[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        engine = self.sam.engine if self.sam is not None else None
        self.second_pass.append(bool(engine is not None and engine.needs_second_pass()))
        self.sync()
        self.starts.append(so.clocks())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.sync()
        self.ends.append(so.clocks())


def run_lightning(
    method: Method, spec: so.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> Run:
    total = warmup + steps
    module = so.BenchModule(so.make_model(spec, device))
    sam = None
    if method.variant is not None:
        sam = SAMCallback(variant=method.variant, interval=method.interval, **dict(method.options))
    timer = CycleTimer(so.synchronizer(device), sam)
    trainer = so.make_trainer(device, total, [timer] + ([sam] if sam is not None else []))
    loader = DataLoader(so.SameBatch(batch, total), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if len(timer.ends) != total:
        raise RuntimeError(f"{method.name}: expected {total} steps, timed {len(timer.ends)}")
    timed = range(warmup, total)
    s, e = timer.starts, timer.ends
    return Run(
        wall_s=[e[i][0] - s[i][0] for i in timed],
        cpu_s=[e[i][1] - s[i][1] for i in timed],
        second_pass=[timer.second_pass[i] for i in timed],
    )


def run_row(
    harness: str,
    method: Method,
    spec: so.ModelSpec,
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
        expected = [False] * len(run.second_pass)
    elif method.cycled:
        expected = [i % k == 0 for i in range(len(run.second_pass))]
    else:
        expected = [True] * len(run.second_pass)
    if run.second_pass != expected:
        pattern = "".join("S" if s else "." for s in run.second_pass)
        raise RuntimeError(f"{row}: unexpected pass-2 schedule in the timed steps: {pattern}")


# ---------------------------------------------------------------------------------------------------- statistics


def cycle_means(times: list[float], k: int) -> list[float]:
    return [statistics.fmean(times[i : i + k]) for i in range(0, len(times) - k + 1, k)]


def _spread(values: list[float]) -> dict[str, Any]:
    ms = [v * 1e3 for v in values]
    return {"ms": statistics.median(ms), "min": min(ms), "max": max(ms), "runs": ms}


def summarize(runs: list[Run], method: Method, k: int) -> dict[str, Any]:
    """Per clock: the cycle-averaged step (median over cycles, then over runs); for cycled rows also the median SAM
    step and the median cheap step."""
    out: dict[str, Any] = {}
    for clock in CLOCKS:
        per_run = [getattr(r, f"{clock}_s") for r in runs]
        out[clock] = _spread([statistics.median(cycle_means(t, k)) for t in per_run])
        if method.cycled:
            out[f"{clock}_sam_step"] = _spread([statistics.median(t[0::k]) for t in per_run])
            out[f"{clock}_cheap_step"] = _spread(
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


def fmt(stats: dict[str, Any]) -> str:
    return f"{stats['ms']:.2f} ({stats['min']:.2f}..{stats['max']:.2f})"


def print_report(results: dict[str, Any], methods: dict[str, Method], harnesses: list[str], k: int) -> None:
    models = list(results)
    names = [m for m in methods if m in results[models[0]]["rows"][harnesses[0]]]
    for harness in harnesses:
        print(f"\n### {harness}: ms per step, averaged over whole {k}-step cycles, median (min..max) of the runs\n")
        header = ["method"] + [f"{x} {c}" for x in models for c in CLOCKS]
        rows = [[n] + [fmt(results[x]["rows"][harness][n][c]) for x in models for c in CLOCKS] for n in names]
        print(so.md_table(header, rows))
        cycled = [n for n in names if methods[n].cycled]
        if cycled:
            print(f"\n{harness}, cycled rows: the SAM step and the cheap step alone (median step), ms\n")
            header = ["method", "step"] + [f"{x} {c}" for x in models for c in CLOCKS]
            rows = [
                [n, kind] + [fmt(results[x]["rows"][harness][n][f"{c}_{kind}_step"]) for x in models for c in CLOCKS]
                for n in cycled
                for kind in ("sam", "cheap")
            ]
            print(so.md_table(header, rows))
        ratio_names = list(results[models[0]]["ratios"][harness]["cpu"])
        print(f"\n{harness}: ratios of the cycle-averaged steps (wall / cpu)\n")
        rows = [
            [r] + [" / ".join(f"{results[x]['ratios'][harness][c][r]:.2f}" for c in CLOCKS) for x in models]
            for r in ratio_names
        ]
        print(so.md_table(["ratio", *models], rows))


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5, help="the interval of sam_i<k> and LookSAM's k (default 5)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, rounded up to a multiple of k")
    parser.add_argument("--warmup-cycles", type=int, default=2, help="untimed k-step cycles before each run (2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row, interleaved (default 5)")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset of: " + ",".join(so.MODELS))
    parser.add_argument("--methods", default="all", help="comma-separated subset of the rows, or 'all' (default)")
    parser.add_argument("--harnesses", default=",".join(HARNESSES), help="lightning,engine (default: both)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
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

    so.quiet()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        torch.backends.cudnn.benchmark = True
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "k": k,
        "steps": steps,
        "warmup": warmup,
        "repeats": args.repeats,
    }
    print("env: " + ", ".join(f"{key}={v}" for key, v in env.items()))
    rows = [(h, m) for h in harnesses for m in methods.values()]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for spec in (so.MODELS[x] for x in args.models.split(",")):
        batch = so.make_batch(spec, device)
        for harness, method in rows:  # prime: first-call costs are not timed
            run_row(harness, method, spec, device, warmup, k, batch)
        runs: dict[tuple[str, str], list[Run]] = {(h, m.name): [] for h, m in rows}
        for repeat in range(args.repeats):
            parts = []
            for harness, method in rows:
                run = run_row(harness, method, spec, device, warmup, steps, batch)
                check_schedule(f"{spec.name} {harness}/{method.name}", method, run, k)
                runs[harness, method.name].append(run)
                avg = statistics.median(cycle_means(run.cpu_s, k)) * 1e3
                parts.append(f"{harness[0]}/{method.name} {avg:.1f}")
            print(f"[{spec.name} repeat {repeat + 1}/{args.repeats}] cpu ms/step: " + ", ".join(parts), flush=True)
        model_result: dict[str, Any] = {"description": spec.description, "rows": {}, "ratios": {}}
        for harness in harnesses:
            summary = {m.name: summarize(runs[harness, m.name], m, k) for m in methods.values()}
            model_result["rows"][harness] = summary
            model_result["ratios"][harness] = ratios(summary, methods, k)
        results[spec.name] = model_result
    elapsed = time.perf_counter() - started
    print_report(results, methods, harnesses, k)
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    out = {"env": env, "elapsed_s": elapsed, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
