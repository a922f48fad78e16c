"""Per-epoch cost of XSAM against SAM, and the cost of one alpha search (a benchmark script, not a test).

For each model (a small CNN with BatchNorm, a deep MLP), on synthetic tensors only, it times whole epochs of
``--steps-per-epoch`` distinct batches with:

=======================  ===============================================================================
lightning_sam            ``Trainer.fit`` with ``callbacks=[SAMCallback("sam")]``
lightning_xsam           ``SAMCallback("xsam")`` with its defaults: ``steps=1``, the alpha search (21 forward-only
                         probes) on the first batch of each epoch
lightning_xsam_fixed     ``SAMCallback("xsam", alpha=0.5, alpha_every=0)``: no search, but the explicit descent
                         direction is built every step (``alpha != 1``): the per-step cost of XSAM alone
lightning_xsam_k2        ``SAMCallback("xsam", steps=2)``: two ascent passes (3 forward/backward per step)
engine_sam               plain PyTorch loop, ``SAMEngine(variant="sam").step(closure, optimizer)``
engine_xsam              ``SAMEngine(variant="xsam", alpha_every=<steps per epoch>)``, ``step(closure, optimizer,
                         probe=...)`` with a forward-only probe that puts BatchNorm's buffers back (the
                         callback's schedule and side-effect rule, by hand)
engine_xsam_fixed        the engine with ``alpha=0.5, alpha_every=0``
engine_xsam_k2           the engine with ``steps=2`` and the per-epoch search
=======================  ===============================================================================

Optional row (``--methods``): ``engine_xsam_closure``, the engine without ``probe=``: the search then calls the
training closure, whose backward is wasted.

What is measured, per run (a fresh model, optimizer and Trainer): ``--warmup-epochs`` untimed epochs, then
``--epochs`` timed ones. An epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (Lightning:
data fetch, every step, Lightning's per-batch bookkeeping) or around the loop over the batches (engine). Steps
are timed too (Lightning: ``on_train_batch_start`` to ``on_train_batch_end``), and ``XSAM._search`` is wrapped by
a timer, so the search's own cost is read directly. "step" below is the median of the steps that do not search.
Every time is taken on two clocks: wall (``perf_counter``) and process CPU time (``process_time``); with one
torch thread on a CPU, CPU time is the work itself and leaves out time spent waiting for a core, which makes it
the clock to trust on a shared machine.

Noise: the methods are interleaved (each repeat runs every method once, per model), a run's value is the median
of its timed epochs (or steps, or searches), and the reported value is the median over ``--repeats`` runs with
the min..max of the run values. Threads: ``torch.set_num_threads(--threads)``, default 1 (see
``bench/step_overhead.py``: two threads on the shared 2-core machine made steps hostage to other processes).

Derived numbers: ``xsam/sam`` per epoch (the goal is <= 1.02), ``search/step`` (one search in units of one XSAM
step), and the break-even epoch length ``N* = search / (1.02 * step_sam - step_xsam)``: with at least ``N*``
steps per epoch the default per-epoch search keeps XSAM within 1.02x of SAM (inf when the per-step cost alone
exceeds 2%).

Usage::

    python bench/xsam_overhead.py                              # defaults: cnn,mlp, CPU, 50 steps/epoch
    python bench/xsam_overhead.py --epochs 3 --steps-per-epoch 50 --repeats 3 --json out.json
    python bench/xsam_overhead.py --device cuda --methods all
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared models, batches, LightningModule and Trainer of bench/

from lightning_sam import SAMCallback, SAMEngine
from lightning_sam.variants.xsam import XSAM

# method -> (variant, options); "{spe}" is replaced by the steps per epoch (the engine's search period)
METHOD_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("sam", {}),
    "xsam": ("xsam", {}),
    "xsam_fixed": ("xsam", {"alpha": 0.5, "alpha_every": 0}),
    "xsam_k2": ("xsam", {"steps": 2}),
    "xsam_closure": ("xsam", {}),
}
DEFAULT_METHODS = [
    "lightning_sam",
    "lightning_xsam",
    "lightning_xsam_fixed",
    "lightning_xsam_k2",
    "engine_sam",
    "engine_xsam",
    "engine_xsam_fixed",
    "engine_xsam_k2",
]
OPTIONAL_METHODS = ["engine_xsam_closure"]
METHODS = DEFAULT_METHODS + OPTIONAL_METHODS
MODELS = {name: wl.MODELS[name] for name in ("cnn", "mlp")}

# ---------------------------------------------------------------------------------------------------- timing


@dataclass
class RunResult:
    """One run: times of the timed epochs, of their non-search steps and of their searches (s, wall and CPU)."""

    epoch_wall: list[float] = field(default_factory=list)
    epoch_cpu: list[float] = field(default_factory=list)
    step_wall: list[float] = field(default_factory=list)
    step_cpu: list[float] = field(default_factory=list)
    search_wall: list[float] = field(default_factory=list)
    search_cpu: list[float] = field(default_factory=list)
    descent_wall: list[float] = field(default_factory=list)  # XSAM.descent_ on timed steps without a search
    descent_cpu: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)  # alpha after each timed search

    def add(self, what: str, start: timing.Reading, end: timing.Reading) -> None:
        getattr(self, f"{what}_wall").append(end[0] - start[0])
        getattr(self, f"{what}_cpu").append(end[1] - start[1])


class SearchTimer:
    """Wraps ``XSAM._search`` and ``XSAM.descent_`` (for the whole benchmark).

    ``records``: (wall, CPU, alpha chosen) of each search. ``descents``: (wall, CPU) of each ``descent_`` call
    that did not search (the per-step work of XSAM: the explicit descent direction).
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.records: list[tuple[float, float, float]] = []
        self.descents: list[tuple[float, float]] = []
        self._searched = False  # a search ran inside the current descent_ call

    def clear(self) -> None:
        self.records.clear()
        self.descents.clear()
        self._searched = False

    def _on_search(self, wall: float, cpu: float, args: tuple[Any, ...]) -> None:
        self.records.append((wall, cpu, args[0].alpha))
        self._searched = True

    def _on_descent(self, wall: float, cpu: float, args: tuple[Any, ...]) -> None:
        if not self._searched:
            self.descents.append((wall, cpu))
        self._searched = False

    @contextmanager
    def installed(self) -> Iterator[SearchTimer]:
        undo = [
            timing.wrap_timed(XSAM, "_search", self._on_search, self.sync),
            timing.wrap_timed(XSAM, "descent_", self._on_descent, self.sync),
        ]
        try:
            yield self
        finally:
            for restore in reversed(undo):
                if restore is not None:
                    restore()


def split_method(method: str) -> tuple[str, str, dict[str, Any]]:
    kind, key = method.split("_", 1)
    variant, options = METHOD_OPTIONS[key]
    return kind, variant, dict(options)


def fill_searches(result: RunResult, timer: SearchTimer, warmup_epochs: int, steps_per_epoch: int) -> None:
    """Keep the searches and descents of the timed epochs (one search per epoch; the warm-up epochs' come first)."""
    for wall, cpu, alpha in timer.records[warmup_epochs:]:
        result.search_wall.append(wall)
        result.search_cpu.append(cpu)
        result.alphas.append(alpha)
    searches_per_epoch = 1 if timer.records else 0
    for wall, cpu in timer.descents[warmup_epochs * (steps_per_epoch - searches_per_epoch) :]:
        result.descent_wall.append(wall)
        result.descent_cpu.append(cpu)


# ---------------------------------------------------------------------------------------------------- engine


def bn_safe_probe(model: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A forward-only probe that puts the normalization layers' running statistics back (training mode)."""
    buffers = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]
    saved = [torch.empty_like(b) for b in buffers]

    def probe() -> Tensor:
        if buffers:
            torch._foreach_copy_(saved, buffers)
        with torch.no_grad():
            value = loss()
        if buffers:
            torch._foreach_copy_(buffers, saved)
        return value

    return probe


def run_engine(
    method: str,
    spec: wl.ModelSpec,
    device: torch.device,
    batches: list[tuple[Tensor, Tensor]],
    warmup_epochs: int,
    epochs: int,
    timer: SearchTimer,
) -> RunResult:
    _, variant, options = split_method(method)
    model = wl.make_model(spec, device).train()
    optimizer = wl.make_optimizer(model.parameters())
    if variant == "xsam" and "alpha_every" not in options:
        options["alpha_every"] = len(batches)  # the callback's default: the first batch of each epoch
    engine = SAMEngine(model.named_parameters(), variant, **options)
    use_probe = method != "engine_xsam_closure"
    current: list[tuple[Tensor, Tensor]] = [batches[0]]

    def loss() -> Tensor:
        x, y = current[0]
        return F.cross_entropy(model(x), y)

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    probe = bn_safe_probe(model, loss) if variant == "xsam" and use_probe else None
    sync = timing.synchronizer(device)
    result = RunResult()
    timer.clear()
    for epoch in range(warmup_epochs + epochs):
        timed = epoch >= warmup_epochs
        sync()
        e0 = timing.clocks()
        for i, batch in enumerate(batches):
            current[0] = batch
            s0 = timing.clocks()
            engine.step(closure, optimizer, probe=probe)
            sync()
            if timed and i > 0:  # step 0 of an epoch is the search step of the XSAM rows
                result.add("step", s0, timing.clocks())
        if timed:
            result.add("epoch", e0, timing.clocks())
    fill_searches(result, timer, warmup_epochs, len(batches))
    return result


# ---------------------------------------------------------------------------------------------------- lightning


def run_lightning(
    method: str,
    spec: wl.ModelSpec,
    device: torch.device,
    batches: list[tuple[Tensor, Tensor]],
    warmup_epochs: int,
    epochs: int,
    timer: SearchTimer,
) -> RunResult:
    _, variant, options = split_method(method)
    module = wl.BenchModule(wl.make_model(spec, device))
    clock = timing.LightningTimer(timing.synchronizer(device))
    callbacks = [clock, SAMCallback(variant, **options)]
    trainer = wl.make_trainer(device, -1, callbacks, max_epochs=warmup_epochs + epochs)
    timer.clear()
    trainer.fit(module, train_dataloaders=DataLoader(wl.Batches(batches), batch_size=None))
    if len(clock.epochs) != warmup_epochs + epochs:
        raise RuntimeError(f"{method}: expected {warmup_epochs + epochs} epochs, timed {len(clock.epochs)}")
    result = RunResult()
    for start, end in clock.epochs[warmup_epochs:]:
        result.add("epoch", start, end)
    for (epoch, idx), start, end in zip(clock.batches, clock.starts, clock.ends):
        if epoch >= warmup_epochs and idx > 0:
            result.add("step", start, end)
    fill_searches(result, timer, warmup_epochs, len(batches))
    return result


def run_method(method: str, *args: Any) -> RunResult:
    """``run_lightning`` or ``run_engine`` (same arguments), by the method's prefix."""
    runner = run_lightning if method.startswith("lightning_") else run_engine
    return runner(method, *args)


# ---------------------------------------------------------------------------------------------------- results


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Median over runs of each run's median (ms), with the min..max of the run medians."""
    out: dict[str, Any] = {}
    for clock in timing.CLOCKS:
        for what in COLUMNS:
            out[f"{what}_{clock}"] = timing.median_of_medians([getattr(r, f"{what}_{clock}") for r in runs])
    out["alphas"] = [a for r in runs for a in r.alphas]
    return out


def ratios(summary: dict[str, dict[str, Any]], clock: str, steps_per_epoch: int) -> dict[str, float]:
    """Per-epoch ratios, search and descent cost in steps, and the break-even epoch length, for the rows that ran.

    Besides the measured epoch ratios, the XSAM/SAM epoch ratio is rebuilt from the parts that are timed directly
    (robust to the odd slow step, unlike the epoch totals or the difference of two rows' step medians):
    ``modelled = 1 + descent / step_sam + search / (N * step_sam)`` with ``descent`` the median ``XSAM.descent_``
    of a step without search, ``search`` the median search and ``N`` the steps per epoch. The break-even epoch
    length for <= 1.02x is ``N* = search / (0.02 * step_sam - descent)`` (inf when the per-step work alone
    exceeds 2%).
    """

    def v(method: str, what: str) -> float | None:
        entry = summary.get(method, {}).get(f"{what}_{clock}")
        return None if entry is None else entry["ms"]

    out: dict[str, float] = {}
    for kind in ("lightning", "engine"):
        sam = v(f"{kind}_sam", "epoch")
        for key in ("xsam", "xsam_fixed", "xsam_k2", "xsam_closure"):
            value = v(f"{kind}_{key}", "epoch")
            if sam and value:
                out[f"{kind}: {key}/sam per epoch"] = value / sam
        k1, k2 = v(f"{kind}_xsam", "epoch"), v(f"{kind}_xsam_k2", "epoch")
        if k1 and k2:
            out[f"{kind}: xsam_k2/xsam per epoch"] = k2 / k1
        sam_step, fixed_step = v(f"{kind}_sam", "step"), v(f"{kind}_xsam_fixed", "step")
        if sam_step and fixed_step:
            out[f"{kind}: xsam_fixed/sam per step"] = fixed_step / sam_step
        for key in ("xsam", "xsam_k2", "xsam_closure"):
            search, step = v(f"{kind}_{key}", "search"), v(f"{kind}_{key}", "step")
            if search and step:
                out[f"{kind}: {key} search/step"] = search / step
        search, descent = v(f"{kind}_xsam", "search"), v(f"{kind}_xsam", "descent")
        if descent and sam_step:
            out[f"{kind}: xsam descent_/step_sam"] = descent / sam_step
        if search and descent and sam_step:
            n = steps_per_epoch
            out[f"{kind}: xsam/sam per epoch, modelled"] = 1 + descent / sam_step + search / (n * sam_step)
            margin = 0.02 * sam_step - descent
            out[f"{kind}: steps/epoch for xsam <= 1.02x sam"] = search / margin if margin > 0 else float("inf")
    return out


COLUMNS = ("epoch", "step", "search", "descent")


def print_tables(results: dict[str, dict[str, Any]], methods: list[str], device: torch.device) -> None:
    shown = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    for name, entry in results.items():
        summary = entry["methods"]
        print(f"\n{name}: {entry['description']}; ms, median over runs (min..max of the run medians)\n")
        header = ["method"] + [f"{what} {c}" for what in COLUMNS for c in shown]
        rows = [
            [m] + [timing.fmt_spread(summary[m].get(f"{what}_{c}"), 1) for what in COLUMNS for c in shown]
            for m in methods
        ]
        print(timing.md_table(header, rows))
        alphas = {m: sorted({round(a, 2) for a in summary[m]["alphas"]}) for m in methods if summary[m]["alphas"]}
        if alphas:
            print("\nalpha chosen by the timed searches: " + "; ".join(f"{m} {a}" for m, a in alphas.items()))
        print("\nratios (" + " / ".join(shown) + ")\n")
        names = list(entry["ratios"][shown[0]])
        rows = timing.ratio_rows(names, [name], lambda _, c, n, entry=entry: entry["ratios"][c][n], shown, 3)
        print(timing.md_table(["ratio", name], rows))


def reprint(path: str) -> dict[str, Any]:
    """Print the tables of a ``--json`` file again, with the ratios recomputed by this version of the script."""
    with open(path) as f:
        saved = json.load(f)
    env = saved["env"]
    timing.print_env(env)
    device = torch.device(env["device"] if env["device"] == "cpu" else "cuda")
    shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for entry in saved["results"].values():
        entry["ratios"] = {c: ratios(entry["methods"], c, env["steps_per_epoch"]) for c in shown}
    methods = [m for m in METHODS if m in next(iter(saved["results"].values()))["methods"]]
    print_tables(saved["results"], methods, device)
    return saved


# ---------------------------------------------------------------------------------------------------- main


def progress(last: dict[str, RunResult]) -> str:
    """The progress line of one repeat: each method's median epoch, wall/cpu ms."""
    return "epoch wall/cpu ms: " + ", ".join(
        f"{m} {statistics.median(r.epoch_wall) * 1e3:.0f}/{statistics.median(r.epoch_cpu) * 1e3:.0f}"
        for m, r in last.items()
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before them (default 1)")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="batches per epoch (default 50)")
    timing.add_common_args(parser, MODELS, steps=None, warmup=None, repeats=3)
    timing.add_methods_arg(parser, METHODS, DEFAULT_METHODS)
    parser.add_argument("--from-json", metavar="PATH", help="re-print the tables of a saved run and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        return reprint(args.from_json)
    if args.epochs < 1 or args.steps_per_epoch < 2 or args.repeats < 1 or args.warmup_epochs < 0:
        sys.exit("need --epochs >= 1, --steps-per-epoch >= 2, --repeats >= 1, --warmup-epochs >= 0")

    timing.quiet()
    device = timing.setup(args.threads, args.device)
    models = [MODELS[m] for m in args.models.split(",")]
    methods = timing.selected(args.methods, METHODS)

    env = timing.environment(
        device,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        steps_per_epoch=args.steps_per_epoch,
        repeats=args.repeats,
    )
    timing.print_env(env)
    timer = SearchTimer(timing.synchronizer(device))
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with timer.installed():
        for spec in models:
            batches = wl.make_batches(spec, device, args.steps_per_epoch)
            runs = timing.interleave(
                methods,
                lambda m, spec=spec, b=batches: run_method(m, spec, device, b, args.warmup_epochs, args.epochs, timer),
                args.repeats,
                # prime: first-call costs (oneDNN primitives, Trainer imports) are not timed
                prime=lambda m, spec=spec, b=batches: run_method(m, spec, device, b[:3], 0, 1, timer),
                label=spec.name,
                report=progress,
            )
            summary = {m: summarize(r) for m, r in runs.items()}
            shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
            results[spec.name] = {
                "description": spec.description,
                "parameters": wl.param_count(spec),
                "methods": summary,
                "ratios": {c: ratios(summary, c, args.steps_per_epoch) for c in shown},
            }
    elapsed = time.perf_counter() - t_start
    print_tables(results, methods, device)
    return timing.finish(env, elapsed, results, args.json)


if __name__ == "__main__":
    main()
