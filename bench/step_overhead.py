"""Per-step cost of lightning_sam against plain PyTorch and plain Lightning (a benchmark script, not a test).

For each model (a small CNN with BatchNorm, a deep MLP), on synthetic tensors only, it times one training step of:

====================  =====================================================================================
plain                 plain PyTorch loop: one forward/backward + ``optimizer.step()``
floor2                plain PyTorch loop: two forward/backward + one ``optimizer.step()`` (the physical floor
                      of any two-pass method such as SAM)
engine_sam            plain PyTorch loop with ``SAMEngine(variant="sam")``: pass 1, ascend, pass 2, descend, step
engine_asam           the same with ``variant="asam"``
lightning_plain       ``Trainer.fit`` of the same model as a LightningModule, no SAM
lightning_sam         the same with ``callbacks=[SAMCallback("sam")]``
lightning_asam        the same with ``callbacks=[SAMCallback("asam")]``
====================  =====================================================================================

Optional rows (not in the default run; select them with ``--methods``, or ``--methods all``):

====================  =====================================================================================
engine_ssam           ``SAMEngine(variant="ssam")`` with its defaults (Fisher mask, sparsity 0.5), the mask built
                      before the timed steps (outside the timing, once per run); its refresh period is set past
                      the run, so every timed step is a steady-state SSAM step (refresh cost:
                      ``bench/ssam_memory.py``)
engine_fsam           ``SAMEngine(variant="fsam")`` with its defaults
lightning_ssam        ``SAMCallback("ssam")`` with its defaults: the callback refreshes the mask once per epoch
                      and here one fit is one epoch, so its only Fisher pass (128 samples) runs in the first
                      steps, which are warm-up steps as long as ``--warmup`` covers them (>= 2 for the CNN's
                      batch of 64, >= 1 for the MLP's 128)
lightning_fsam        ``SAMCallback("fsam")`` with its defaults
====================  =====================================================================================

(``--breakdown lightning_ssam`` runs without warm-up steps, so its mean includes that Fisher pass, in
``SAMCallback.on_train_batch_start``.)

Lightning steps are timed by a callback (first in the callback list) from ``on_train_batch_start`` to
``on_train_batch_end`` ("window": training_step, backward, SAM's pass 2 in ``on_before_optimizer_step``,
``optimizer.step``, zero_grad). The "cycle" (``on_train_batch_start`` to the next one) also includes the data
fetch and Lightning's end-of-batch bookkeeping (logged metrics such as ``sam/sharpness``).

Noise handling: the methods are interleaved (repeat r runs every method once, in order), each run does
``--warmup`` untimed steps then ``--steps`` timed ones; a run's value is its median step time, and the reported
value is the median over ``--repeats`` runs, with the min..max of the run medians as the spread. Two clocks are
recorded per step: wall time (``perf_counter``) and process CPU time (``process_time``). On a CPU run with one
thread the CPU time is the step's own work and does not count the time the process waits for a core, so it stays
usable on a machine shared with other jobs (on CUDA only wall time is meaningful and only it is shown).

Fair comparison of the Lightning rows: Lightning's own per-step overhead is in both lightning rows, so the
"fair" ratio is ``lightning_sam / (lightning_plain + (floor2 - plain))``: plain Lightning plus exactly one extra
forward/backward. 1.00 means the callback costs nothing beyond SAM's unavoidable second pass.

Memory: with ``--device cuda`` the peak ``torch.cuda.max_memory_allocated`` of each run is reported. On CPU there
is no reliable per-run peak for torch tensors (the allocator and ``ru_maxrss`` are process-wide), so only times
are reported; the output lists the parameter size instead, which is the persistent extra memory of
``SAMEngine`` (one saved copy of the weights).

Threads: ``torch.set_num_threads(--threads)``, default 1. On the shared 2-core reference machine two intra-op
threads made every step hostage to any other process (OpenMP barriers stall when one of the two cores is busy:
single steps went from ~30 ms to 150-1000 ms), while one thread kept the run-to-run spread small. The ratios are
what this script is for; on a dedicated machine pass ``--threads`` = the core count. Each run also starts with
a priming pass over all methods (untimed) so that first-call costs do not land in the first method.

Usage::

    python bench/step_overhead.py                                  # defaults: cnn,mlp, CPU, ~1-3 min on 2 cores
    python bench/step_overhead.py --device cuda --json out.json
    python bench/step_overhead.py --profile lightning_sam --models cnn   # cProfile of the callback's step
    python bench/step_overhead.py --breakdown lightning_sam --steps 100  # ms/step in each SAM phase
    python bench/step_overhead.py --methods all                    # + the ssam and fsam rows
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared models, batches, LightningModule and Trainer of bench/
from timing import StepTimes as RunResult  # one run's per-step times

from lightning_sam import SAMCallback, SAMEngine

BASE_METHODS = [
    "plain",
    "floor2",
    "engine_sam",
    "engine_asam",
    "lightning_plain",
    "lightning_sam",
    "lightning_asam",
]
EXTRA_VARIANTS = ["ssam", "fsam"]  # optional rows: engine_<variant>, lightning_<variant>
EXTRA_METHODS = [f"{kind}_{v}" for v in EXTRA_VARIANTS for kind in ("engine", "lightning")]
METHODS = BASE_METHODS + EXTRA_METHODS  # every known row, in table order
MODELS = wl.MODELS  # cnn, mlp (the default) and mlp48 (194 tensors, for --breakdown / --profile)

# ---------------------------------------------------------------------------------------------------- steps


def make_engine(model: nn.Module, variant: str, **options: Any) -> SAMEngine:
    if variant == "ssam":
        options.setdefault("mask_every", wl.NEVER)  # steady-state steps only: no refresh inside a run
    return SAMEngine(model.named_parameters(), variant=variant, **options)


def plain_loop_step(method: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """One training step of ``method`` as a closure over a fresh optimizer (and engine)."""
    x, y = batch
    optimizer = wl.make_optimizer(model.parameters())

    def loss() -> Tensor:
        return F.cross_entropy(model(x), y)

    if method == "plain":

        def step() -> None:
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()

    elif method == "floor2":

        def step() -> None:
            optimizer.zero_grad()
            loss().backward()
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()

    elif method.startswith("engine_"):
        engine = make_engine(model, method.removeprefix("engine_"))
        if engine.samples_needed():  # SSAM: the mask exists before the first (warm-up) step
            wl.build_fisher_mask(engine, model, batch)

        def step() -> None:
            optimizer.zero_grad()
            loss().backward()
            engine.ascend()
            optimizer.zero_grad()
            loss().backward()
            engine.descend()
            optimizer.step()

    else:
        raise ValueError(method)
    return step


def run_plain(
    method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    result = timing.time_loop(
        plain_loop_step(method, wl.make_model(spec, device).train(), batch), warmup, steps, device
    )
    result.values.clear()
    return result


def lightning_callbacks(method: str) -> list[Callback]:
    if method == "lightning_plain":
        return []
    return [SAMCallback(variant=method.removeprefix("lightning_"))]


def run_lightning(
    method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    total = warmup + steps + 1  # +1: the last timed step's cycle ends at the next batch start
    module = wl.BenchModule(wl.make_model(spec, device))
    timer = timing.LightningTimer(timing.synchronizer(device))
    trainer = wl.make_trainer(device, total, [timer, *lightning_callbacks(method)])
    loader = DataLoader(wl.SameBatch(batch, total), batch_size=None)
    timing.reset_peak(device)
    trainer.fit(module, train_dataloaders=loader)
    if len(timer.ends) != total:
        raise RuntimeError(f"{method}: expected {total} steps, timed {len(timer.ends)}")
    result = timer.step_times(warmup, warmup + steps)
    result.peak_mb = timing.read_peak(device)
    return result


def run_method(
    method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    runner = run_lightning if method.startswith("lightning_") else run_plain
    return runner(method, spec, device, warmup, steps, batch)


# ---------------------------------------------------------------------------------------------------- results


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Per clock: the median of the per-run median step times, and the min/max of those run medians (ms)."""
    out: dict[str, Any] = {c: timing.median_of_medians([r.get(c) for r in runs]) for c in timing.CLOCKS}
    if runs[0].cycle_wall_s:
        for c in timing.CLOCKS:
            out[f"cycle_{c}"] = timing.median_of_medians([r.get(c, cycle=True) for r in runs])
    peaks = [r.peak_mb for r in runs if r.peak_mb is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    return out


def ratios(s: dict[str, dict[str, Any]], clock: str) -> dict[str, float]:
    """The overhead ratios from the per-method median step times of ``clock`` ("wall" or "cpu")."""

    def v(method: str) -> float:
        return s[method][clock]["ms"]

    extra_pass = v("floor2") - v("plain")  # one more forward/backward
    out = {
        "floor2/plain": v("floor2") / v("plain"),
        "engine_sam/floor2": v("engine_sam") / v("floor2"),
        "engine_asam/floor2": v("engine_asam") / v("floor2"),
        "lightning_plain/plain": v("lightning_plain") / v("plain"),
    }
    for variant in ("sam", "asam"):
        m = f"lightning_{variant}"
        out[f"{m}/floor2"] = v(m) / v("floor2")
        out[f"{m}/lightning_plain"] = v(m) / v("lightning_plain")
        out[f"{m}/(lightning_plain+floor2-plain)"] = v(m) / (v("lightning_plain") + extra_pass)
    for variant in EXTRA_VARIANTS:  # optional rows, when they ran
        e, m = f"engine_{variant}", f"lightning_{variant}"
        if e in s:
            out[f"{e}/floor2"] = v(e) / v("floor2")
            out[f"{e}/engine_sam"] = v(e) / v("engine_sam")
        if m in s:
            out[f"{m}/(lightning_plain+floor2-plain)"] = v(m) / (v("lightning_plain") + extra_pass)
            out[f"{m}/lightning_sam"] = v(m) / v("lightning_sam")
    return out


def print_tables(results: dict[str, dict[str, Any]], device: torch.device) -> None:
    models = list(results)
    clocks_shown = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    entry = {x: results[x]["methods"] for x in models}
    header = ["method"] + [f"{x} {c} ms" for x in models for c in clocks_shown]
    print("\nms/step: median of the per-run medians (min..max of the per-run medians); cpu = process CPU time\n")
    shown = [m for m in METHODS if m in entry[models[0]]]
    rows = [[m] + [timing.fmt_spread(entry[x][m][c]) for x in models for c in clocks_shown] for m in shown]
    print(timing.md_table(header, rows))
    print("\nLightning cycle (on_train_batch_start to the next one: adds data fetch and end-of-batch logging), ms\n")
    rows = [
        [m] + [timing.fmt_spread(entry[x][m][f"cycle_{c}"]) for x in models for c in clocks_shown]
        for m in shown
        if m.startswith("lightning_")
    ]
    print(timing.md_table(header, rows))
    print("\nRatios of the median step times (" + " / ".join(clocks_shown) + ")\n")
    names = list(results[models[0]]["ratios"]["wall"])
    rows = timing.ratio_rows(names, models, lambda x, c, n: results[x]["ratios"][c][n], clocks_shown)
    print(timing.md_table(["ratio", *models], rows))
    print()
    if device.type == "cuda":
        print("Peak CUDA memory (torch.cuda.max_memory_allocated), MiB\n")
        rows = [[m] + [f"{entry[x][m]['peak_mb']:.1f}" for x in models] for m in shown]
        print(timing.md_table(["method", *models], rows))
    else:
        sizes = ", ".join(f"{x} {results[x]['param_mb']:.2f} MiB" for x in models)
        print("Memory: CPU run, time only (no per-run peak for torch tensors on CPU). SAMEngine's persistent")
        print(f"extra memory is one saved copy of the trained weights: {sizes}.")


# ---------------------------------------------------------------------------------------------------- profile


def profile(method: str, spec: wl.ModelSpec, device: torch.device, steps: int, batch: tuple[Tensor, Tensor]) -> None:
    """cProfile of ``steps`` Lightning steps (after a short warm-up fit), top functions by cumulative time."""
    run_method(method, spec, device, 3, 3, batch)  # warm-up (imports, first-call costs)
    profiler = cProfile.Profile()
    profiler.enable()
    run_method(method, spec, device, 0, steps, batch)
    profiler.disable()
    title = f"cProfile of {method} on {spec.name}: {steps} steps (includes Trainer setup/teardown)"
    timing.print_profile(profiler, title)


# ---------------------------------------------------------------------------------------------------- breakdown

BREAKDOWN_TARGETS = [
    ("SAMCallback.on_before_optimizer_step", "lightning_sam.callback", "SAMCallback", "on_before_optimizer_step"),
    ("  StrategyReplay.second_pass", "lightning_sam.replays", "StrategyReplay", "second_pass"),
    ("    LightningModule.training_step", None, None, "training_step"),
    ("    Strategy.backward", "lightning.pytorch.strategies.strategy", "Strategy", "backward"),
    ("  SAMEngine.ascend", "lightning_sam.engine", "SAMEngine", "ascend"),
    ("  SAMEngine.descend", "lightning_sam.engine", "SAMEngine", "descend"),
    ("  TwoPassStep.after_first_pass", "lightning_sam.step", "TwoPassStep", "after_first_pass"),
    ("  StepMetrics.record", "lightning_sam.metrics", "StepMetrics", "record"),
    ("SAMCallback.on_train_batch_start", "lightning_sam.callback", "SAMCallback", "on_train_batch_start"),
    ("SAMCallback.on_before_backward", "lightning_sam.callback", "SAMCallback", "on_before_backward"),
]


def breakdown(method: str, spec: wl.ModelSpec, device: torch.device, steps: int, batch: tuple[Tensor, Tensor]) -> None:
    """Wall and CPU time per step inside the callback's phases, by wrapping them with timers (no profiler).

    Private methods that the library may rename are skipped when missing. Only meaningful on CPU or with a
    synchronizing device (the wrappers synchronize on CUDA, which slows the step a little).
    """
    totals: dict[str, list[float]] = {}  # label -> [wall s, cpu s]
    calls: dict[str, int] = {}
    restore: list[Callable[[], None]] = []

    def recorder(label: str) -> Callable[[float, float, tuple[Any, ...]], None]:
        def record(wall: float, cpu: float, args: tuple[Any, ...]) -> None:
            total = totals.setdefault(label, [0.0, 0.0])
            total[0] += wall
            total[1] += cpu
            calls[label] = calls.get(label, 0) + 1

        return record

    for label, module_name, class_name, attr in BREAKDOWN_TARGETS:
        if module_name is None:
            owner: Any = wl.BenchModule
        else:
            owner = getattr(importlib.import_module(module_name), class_name, None)
        if owner is None:
            continue
        undo = timing.wrap_timed(owner, attr, recorder(label), timing.synchronizer(device))
        if undo is None:
            print(f"(breakdown: {label} not found, skipped)")
        else:
            restore.append(undo)
    try:
        run_method(method, spec, device, 3, 3, batch)  # warm-up
        totals.clear()
        calls.clear()
        result = run_method(method, spec, device, 0, steps, batch)
    finally:
        for undo in reversed(restore):
            undo()
    n = steps + 1 if method.startswith("lightning_") else steps  # run_lightning runs one extra step
    wall_ms, cpu_ms = statistics.mean(result.wall_s) * 1e3, statistics.mean(result.cpu_s) * 1e3
    print(f"--- breakdown of {method} on {spec.name}: mean over {n} steps ---")
    print("| phase | calls/step | wall ms/step | cpu ms/step |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| whole step (timed window) | 1 | {wall_ms:.3f} | {cpu_ms:.3f} |")
    for label, *_ in BREAKDOWN_TARGETS:
        if label in totals:
            wall, cpu = (t / n * 1e3 for t in totals[label])
            print(f"| {label.strip()} | {calls[label] / n:.0f} | {wall:.3f} | {cpu:.3f} |")


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_common_args(parser, MODELS)
    timing.add_methods_arg(parser, METHODS, BASE_METHODS, "; ratios need every default row")
    parser.add_argument("--profile", metavar="METHOD", help="instead of timing, cProfile METHOD's steps and exit")
    parser.add_argument(
        "--breakdown", metavar="METHOD", help="instead of timing, time the SAM phases inside METHOD's steps and exit"
    )
    args = parser.parse_args(argv)

    timing.quiet()
    device = timing.setup(args.threads, args.device)
    models = [MODELS[m] for m in args.models.split(",")]
    methods = timing.selected(args.methods, METHODS)

    if args.profile:
        for spec in models:
            profile(args.profile, spec, device, args.steps, wl.make_batch(spec, device))
        return {}
    if args.breakdown:
        for spec in models:
            breakdown(args.breakdown, spec, device, args.steps, wl.make_batch(spec, device))
        return {}

    env = timing.environment(device, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    timing.print_env(env)
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for spec in models:
        batch = wl.make_batch(spec, device)
        runs = timing.interleave(
            methods,
            lambda m, spec=spec, batch=batch: run_method(m, spec, device, args.warmup, args.steps, batch),
            args.repeats,
            # prime: first-call costs (oneDNN primitives, Trainer imports) are not timed
            prime=lambda m, spec=spec, batch=batch: run_method(m, spec, device, args.warmup, 1, batch),
            label=spec.name,
            report=timing.median_line,
        )
        summary = {m: summarize(r) for m, r in runs.items()}
        results[spec.name] = {
            "description": spec.description,
            "param_mb": wl.param_megabytes(wl.make_model(spec, device)),
            "methods": summary,
        }
        if set(BASE_METHODS) <= set(methods):
            shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
            results[spec.name]["ratios"] = {c: ratios(summary, c) for c in shown}
    elapsed = time.perf_counter() - t_start
    if all("ratios" in r for r in results.values()):
        print_tables(results, device)
    return timing.finish(env, elapsed, results, args.json)


if __name__ == "__main__":
    main()
