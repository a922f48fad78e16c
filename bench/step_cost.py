"""SAM's per-step cost through SAMCallback, every registered variant, against floor2 and pytorch_optimizer's SAM,
on a small CNN and on a transformer-shaped many-tensor model (a benchmark script, not a test).

Models (``bench/workloads.py``; synthetic tensors, 10 classes, cross-entropy, SGD lr 0.01 momentum 0.9):

=======  ====================================================================================================
cnn      3 x (conv3x3 + BatchNorm + ReLU), 16/32/64 channels, linear head; 3x32x32 inputs, batch 64; 11 tensors
mlp48    48 x (Linear 128 + LayerNorm + GELU) + linear head, batch 128: 194 parameter tensors of <= 64 KiB, the
         shape of a transformer's parameter list, where per-tensor work (Python loops, kernel launches) dominates
=======  ====================================================================================================

For a GPU (``--models``, not in the default list; ``bench/gpu_check.sh`` runs them): ``resnet18`` (ResNet-18,
11.2M parameters in 62 tensors) and ``vit_s16`` (ViT-S/16, 21.7M parameters in 152 tensors), 3x224x224 inputs,
batch 256 (``--batch`` overrides every selected model's batch, e.g. for a CPU smoke run).

Methods, each one Lightning training step (``Trainer.fit``, one epoch, the same pre-built batch every step):

===================  ===================================================================================
floor1               plain Lightning: automatic optimization, the plain SGD step (one forward/backward)
floor2               floor1 plus one more forward/backward through ``trainer.strategy`` (``training_step`` +
                     ``backward`` in a callback's ``on_before_optimizer_step``), no perturbation: the least any
                     two-pass method can cost in Lightning. The ratios are ``method / floor2``.
pytorch_optimizer    pytorch_optimizer's ``SAM(params, torch.optim.SGD, rho=0.05, lr, momentum)`` as its users
                     write it in Lightning: manual optimization, ``opt.zero_grad(); loss = closure();
                     opt.step(closure=closure)`` with ``closure`` = forward + ``manual_backward`` (its defaults:
                     ``foreach=None``, i.e. per-tensor loops on CPU, foreach on CUDA)
<variant>            ``callbacks=[SAMCallback(variant=<variant>)]`` for every variant of ``available_variants()``,
                     with its defaults except where a variant needs an option to run here (below)
===================  ===================================================================================

Per-variant setup, so that every timed step is a steady-state step:

* ``ssam``: defaults (Fisher mask, sparsity 0.5, refreshed once per epoch). One fit is one epoch, so its only Fisher
  pass (128 samples: 2 steps at batch 64, 1 at batch 128) runs in the warm-up steps (``--warmup`` >= 2; a smaller
  ``--batch`` raises ``--warmup`` to the steps the 128 samples take).
* ``xsam``: defaults (rho 0.15, one ascent pass, alpha searched on the first batch of each epoch): the only search
  runs at step 0, a warm-up step; the timed steps keep the alpha it found (printed; for alpha != 1 every step
  builds the explicit descent direction, for alpha = 1 the step is SAM's). Search cost: ``bench/xsam_overhead.py``.
* ``looksam``: defaults (k = 5): one SAM step and 4 one-pass steps per cycle, so a run's value is the median over
  its whole 5-step cycles of the mean step (``--steps`` is rounded up to a multiple of 5). It is below floor2 on
  average by design (marked ``‡``).
* ``bar``: BAR rescales (A, B) factor pairs and has no second pass; these models have no LoRA factors, so
  ``pairs=`` pairs consecutive weight matrices (conv/linear weights 1-2, 3-4, ...; the rescaling does not commute
  with the layers in between, which does not matter for its cost). Its natural floor is floor1: the table prints
  it against floor2 like the others and against floor1 (marked ``†``).

Every variant's timed steps are checked against its schedule (the callback's engine is asked before each step
whether it plans pass 2): a mismatch is printed as a warning.

What is timed: a callback first in the callback list reads the clocks at every ``on_train_batch_start``; a step
is the "cycle" from one batch start to the next, so it includes Lightning's whole step (training_step, backward,
``on_before_optimizer_step``, optimizer step, zero_grad), the end-of-batch bookkeeping of logged metrics (where
``self.log`` costs land) and the data fetch (the same in every method). The window ``on_train_batch_start`` to
``on_train_batch_end`` (without the end-of-batch bookkeeping) is also reported.

Noise: one torch thread (``--threads``); process CPU time on CPU (the work itself, not the time spent waiting for
a core on a shared machine; wall time on CUDA, synchronized); freed memory kept mapped
(``timing.keep_freed_memory``: glibc otherwise returns large freed blocks to the kernel and the next step faults
them in again, which made CNN fits vary by up to 45 % in CPU time on the reference VM; ``--default-malloc`` turns
it off). **The methods run in lockstep**: in each repeat every method has its own Trainer in its own thread, and the
threads take turns step by step (a baton handed on at each ``on_train_batch_start``, outside the timed cycle; one
thread runs, the others wait), so step i of every method runs within moments of the others' step i and slow phases
of a shared machine hit every method alike. The turn order rotates by one method per repeat; one untimed repeat runs
first, and every fit has ``--warmup`` untimed steps. A run's value is its median step; **a ratio is the median over
the ``--repeats`` runs of the per-run ratio** (run r of a method over run r of floor2, made side by side), shown with
the min..max of the per-run ratios; times are the best run, with best..worst.

CUDA (``--device cuda``): ``precision="bf16-mixed"``, wall clock, and the peak ``torch.cuda.max_memory_allocated``
of each method in a short fit of its own after the timing (the lockstep threads share the device's allocator).

Goals (the issue "Speed: SAM's per-step cost on transformer-shaped (many-tensor) models"), checked under the
table: on mlp48 ``sam``, ``asam``, ``fsam`` <= 1.03x floor2 and ``ssam``, ``xsam`` <= 1.06x; on cnn every variant
<= 1.01x its floor; ``sam`` faster than pytorch_optimizer's SAM on every model.

Usage::

    python bench/step_cost.py                              # cnn,mlp48, every variant, CPU: ~4 min on 2 shared cores
    python bench/step_cost.py --quick                      # smoke run (~30 s): 5 steps, 1 repeat, no priming
    python bench/step_cost.py --models mlp48 --variants sam,asam --repeats 5 --json step_cost.json
    python bench/step_cost.py --device cuda                # bf16-mixed, wall clock, peak memory
    python bench/step_cost.py --device cuda --models resnet18,vit_s16 --steps 10 --repeats 3  # see gpu_check.sh
    python bench/step_cost.py --quick --models vit_s16 --batch 4 --variants sam   # CPU smoke run of a GPU model
    python bench/step_cost.py --profile sam --models mlp48 # cProfile of the timed steps and of the SAM hook
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib.metadata
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared models, batches, LightningModule and Trainer of bench/

from lightning_sam import SAMCallback, available_variants

try:
    import pytorch_optimizer
except ImportError:  # e.g. a GPU machine's image without it: the method is left out (see main)
    pytorch_optimizer = None

FLOORS = ("floor1", "floor2")
PTO = "pytorch_optimizer"
LOOKSAM_K = 5  # LookSAM's default k, given explicitly: the cycle length of its timing
FIRST = ("sam", "asam", "fsam", "xsam", "ssam", "looksam", "bar")  # column order; other variants follow, sorted
ONE_PASS = {"bar"}  # no second pass: natural floor is floor1
RHO = 0.05  # pytorch_optimizer's SAM radius (SAM's default in both libraries)
SSAM_SAMPLES = 128  # SSAM's default num_samples: its Fisher pass takes ceil(128 / batch) warm-up steps


def weight_pairs(names: list[str], params: list[Tensor]) -> list[tuple[str, str]]:
    """BAR's ``pairs=`` for models without LoRA factors: consecutive weight matrices (ndim >= 2) as (A, B)."""
    weights = [n for n, p in zip(names, params) if p.ndim >= 2]
    return [(weights[i], weights[i + 1]) for i in range(0, len(weights) - 1, 2)]


VARIANT_OPTIONS: dict[str, dict[str, Any]] = {"looksam": {"k": LOOKSAM_K}, "bar": {"pairs": weight_pairs}}
PERIOD = {"looksam": LOOKSAM_K}  # steps per schedule cycle (1 for the others)
GOALS = [  # (model, variants, bound on method / floor)
    ("mlp48", ("sam", "asam", "fsam"), 1.03),
    ("mlp48", ("ssam", "xsam"), 1.06),
    ("cnn", None, 1.01),  # None: every registered variant
]


def variant_names() -> list[str]:
    registered = list(available_variants())
    return [v for v in FIRST if v in registered] + sorted(v for v in registered if v not in FIRST)


def floor_of(method: str) -> str:
    return "floor1" if method in ONE_PASS else "floor2"


# ---------------------------------------------------------------------------------------------------- methods


class SecondPass(Callback):
    """floor2: after Lightning's own forward/backward, one more through ``trainer.strategy``, no perturbation."""

    def __init__(self) -> None:
        self.batch: tuple[Any, int] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batch = (batch, idx)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.batch is not None
        loss = trainer.strategy.training_step(*self.batch)
        trainer.strategy.backward(loss, optimizer)


class PytorchOptimizerSAM(L.LightningModule):
    """pytorch_optimizer's SAM as its users write it in Lightning: manual optimization, ``SAM.step(closure)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()

        def closure() -> Tensor:
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        optimizer.zero_grad()
        loss = closure()
        optimizer.step(closure=closure)
        return loss.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return pytorch_optimizer.SAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=wl.LR, momentum=0.9)


@dataclass
class Setup:
    """One method's LightningModule and callbacks for one fit; ``sam``: the SAMCallback, if any."""

    module: L.LightningModule
    callbacks: list[Callback] = field(default_factory=list)
    sam: SAMCallback | None = None


def make_setup(method: str, spec: wl.ModelSpec, device: torch.device) -> Setup:
    net = wl.make_model(spec, device)
    if method == PTO:
        return Setup(PytorchOptimizerSAM(net))
    if method == "floor1":
        return Setup(wl.BenchModule(net))
    if method == "floor2":
        return Setup(wl.BenchModule(net), [SecondPass()])
    sam = SAMCallback(variant=method, **VARIANT_OPTIONS.get(method, {}))
    return Setup(wl.BenchModule(net), [sam], sam)


# ---------------------------------------------------------------------------------------------------- runs


class Baton:
    """Round-robin turns between the threads of a lockstep repeat: one thread runs, the others wait."""

    def __init__(self, order: list[str]) -> None:
        self.order = list(order)
        self.turn = 0
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.order[self.turn] == name)

    def pass_on(self, name: str) -> None:
        with self.condition:
            self.turn = (self.order.index(name) + 1) % len(self.order)
            self.condition.notify_all()

    def leave(self, name: str) -> None:
        with self.condition:
            index = self.order.index(name)
            self.order.remove(name)
            if self.order:
                self.turn = index % len(self.order)
            self.condition.notify_all()


class LockstepTimer(timing.LightningTimer):
    """A :class:`timing.LightningTimer` that hands the baton on at every batch start, between the reading that ends
    the previous cycle and the one that starts the next: a cycle holds this method's work only."""

    def __init__(self, sync: Callable[[], None], probe: Callable[[], Any] | None, baton: Baton, name: str) -> None:
        super().__init__(sync, probe)
        self.baton, self.name = baton, name
        self.cycle_ends: list[timing.Reading] = []  # read at each batch start, before the hand-over

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.sync()
        self.cycle_ends.append(timing.clocks())
        self.baton.pass_on(self.name)
        self.baton.wait(self.name)
        super().on_train_batch_start(trainer, pl_module, batch, idx)

    def step_times(self, first: int = 0, stop: int | None = None, cycles: bool = True) -> timing.StepTimes:
        out = super().step_times(first, stop, cycles=False)
        if cycles:
            for i in range(first, len(self.ends) if stop is None else stop):
                if i + 1 < len(self.cycle_ends):
                    out.add_cycle(self.starts[i], self.cycle_ends[i + 1])
        return out


@dataclass
class Run:
    """One fit: per-step times (cycle and window), the pass-2 plan of each timed step, peak memory, notes."""

    times: timing.StepTimes
    notes: dict[str, Any] = field(default_factory=dict)


def fit(
    method: str,
    spec: wl.ModelSpec,
    device: torch.device,
    batch: tuple[Tensor, Tensor],
    warmup: int,
    steps: int,
    precision: str | None,
    extra: list[Callback] | None = None,
    baton: Baton | None = None,
) -> Run:
    """``warmup`` + ``steps`` + 1 Lightning steps of ``method``; the steps ``warmup..warmup+steps-1`` are timed (the
    extra step closes the last timed cycle). With ``baton``, in lockstep with the other methods' threads (the peak
    memory is then not this method's alone, and is left out)."""
    total = warmup + steps + 1
    setup = make_setup(method, spec, device)
    sam = setup.sam

    def plans_second_pass() -> bool | None:
        engine = sam.engine if sam is not None else None
        return None if engine is None else bool(engine.needs_second_pass())

    sync, probe = timing.synchronizer(device), plans_second_pass if sam else None
    timer = LockstepTimer(sync, probe, baton, method) if baton else timing.LightningTimer(sync, probe)
    options = {"precision": precision} if precision else {}
    trainer = wl.make_trainer(device, total, [timer, *(extra or []), *setup.callbacks], **options)
    timing.reset_peak(device)
    trainer.fit(setup.module, train_dataloaders=DataLoader(wl.SameBatch(batch, total), batch_size=None))
    if len(timer.ends) != total:
        raise RuntimeError(f"{method}: expected {total} steps, timed {len(timer.ends)}")
    times = timer.step_times(warmup, warmup + steps)
    times.peak_mb = None if baton else timing.read_peak(device)
    run = Run(times)
    if sam is not None and sam.engine is not None:
        variant = getattr(sam.engine, "variant", None)
        if hasattr(variant, "searches") and hasattr(variant, "alpha"):  # XSAM: the alpha the timed steps used
            run.notes = {"alpha": round(float(variant.alpha), 3), "searches": int(variant.searches)}
    return run


def lockstep(order: list[str], fit_one: Callable[[str, Baton], Run]) -> dict[str, Run | Exception]:
    """One fit of every method, each in its own thread, taking turns step by step in ``order`` (a fit's setup and
    each of its steps run while the others wait): each method's step i runs moments after the others' step i."""
    baton = Baton(order)
    results: dict[str, Run | Exception] = {}

    def work(name: str) -> None:
        baton.wait(name)
        try:
            results[name] = fit_one(name, baton)
        except Exception as error:
            results[name] = error
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=work, args=(m,), name=f"step_cost-{m}", daemon=True) for m in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def check_schedule(method: str, run: Run, period: int) -> str | None:
    """A warning when the timed steps' pass-2 plan is not the variant's steady state (None when it is)."""
    plans = run.times.values
    if not plans or any(p is None for p in plans):
        return None
    expected = 0 if method in ONE_PASS else len(plans) // period
    cycles = range(len(plans) - period + 1) if period > 1 else ()
    if sum(plans) != expected or any(sum(plans[i : i + period]) != 1 for i in cycles):
        pattern = "".join("S" if p else "." for p in plans)
        return f"{method}: the timed steps' pass-2 schedule is not the steady state: {pattern}"
    return None


def run_value(times: list[float], period: int) -> float:
    """A run's value: its median step, or for cycled methods its median whole-cycle mean step (s)."""
    return statistics.median(timing.cycle_means(times, period))


# ---------------------------------------------------------------------------------------------------- results


def summarize(runs: dict[str, list[Run]], clock: str, peaks: dict[str, float]) -> dict[str, Any]:
    """Per method and timing (cycle, window): run values (ms), best, median, and ratios to the floors."""
    out: dict[str, Any] = {}
    for kind, cycle in (("cycle", True), ("window", False)):
        values = {
            m: [run_value(r.times.get(clock, cycle), PERIOD.get(m, 1)) * 1e3 for r in rs] for m, rs in runs.items()
        }
        entry: dict[str, Any] = {}
        for m, v in values.items():
            row: dict[str, Any] = {"runs_ms": v, "best_ms": min(v), "median_ms": statistics.median(v), "max_ms": max(v)}
            for floor in FLOORS:
                if floor in values and m != floor:
                    paired = [a / b for a, b in zip(v, values[floor])]
                    row[f"/{floor}"] = {
                        "ratio": statistics.median(paired),
                        "min": min(paired),
                        "max": max(paired),
                        "best_over_best": min(v) / min(values[floor]),
                    }
            entry[m] = row
        out[kind] = entry
    out["peak_mb"] = peaks
    out["notes"] = {m: rs[-1].notes for m, rs in runs.items() if rs[-1].notes}
    return out


def fmt_ratio(row: dict[str, Any], floor: str) -> str:
    r = row.get(f"/{floor}")
    return "-" if r is None else f"{r['ratio']:.3f} ({r['min']:.3f}..{r['max']:.3f})"


def main_table(results: dict[str, Any], methods: list[str], kind: str) -> str:
    """Rows: models; columns: floor2 ms, then method / floor2 (bar also / floor1)."""
    shown = [m for m in methods if m not in FLOORS]
    header = ["model", "floor2 ms"]
    header += ["floor1" if "floor1" in methods else None, *[label(m) for m in shown]]
    if any(m in ONE_PASS for m in shown):
        header += [f"{m} / floor1 †" for m in shown if m in ONE_PASS]
    header = [h for h in header if h is not None]
    rows = []
    for name, entry in results.items():
        table = entry["summary"][kind]
        f2 = table["floor2"]
        row = [
            f"{name}: {entry['tensors']} tensors, batch {entry['batch']}",
            f"{f2['best_ms']:.2f} ({f2['best_ms']:.2f}..{f2['max_ms']:.2f})",
        ]
        if "floor1" in methods:
            row.append(fmt_ratio(table["floor1"], "floor2"))
        row += [fmt_ratio(table[m], "floor2") for m in shown]
        row += [fmt_ratio(table[m], "floor1") for m in shown if m in ONE_PASS]
        rows.append(row)
    return timing.md_table(header, rows)


def label(method: str) -> str:
    if method == PTO:
        return "pytorch_optimizer SAM"
    return f"{method} †" if method in ONE_PASS else f"{method} ‡" if method in PERIOD else method


def ms_table(results: dict[str, Any], methods: list[str], kind: str, cuda: bool) -> str:
    """Rows: methods; columns: models, best ms (min..max of the run values)."""
    models = list(results)
    header = ["method"] + [f"{x} ms" for x in models] + ([f"{x} peak MiB" for x in models] if cuda else [])
    rows = []
    for m in methods:
        row = [label(m)]
        for x in models:
            r = results[x]["summary"][kind][m]
            row.append(f"{r['best_ms']:.2f} ({r['best_ms']:.2f}..{r['max_ms']:.2f})")
        if cuda:
            row += [f"{results[x]['summary']['peak_mb'].get(m, math.nan):.1f}" for x in models]
        rows.append(row)
    return timing.md_table(header, rows)


def goal_checks(results: dict[str, Any], variants: list[str]) -> list[str]:
    """PASS/FAIL lines for the issue's two goals, from the cycle ratios (median of the per-run ratios)."""
    lines = []
    parts = []
    for model, names, bound in GOALS:
        names = tuple(v for v in variants) if names is None else names
        if model not in results:
            parts.append((f"{model}: not run", None))
            continue
        table = results[model]["summary"]["cycle"]
        got = {v: table[v][f"/{floor_of(v)}"]["ratio"] for v in names if v in table}
        if not got:
            parts.append((f"{model}: {', '.join(names)} not run", None))
            continue
        ok = all(r <= bound for r in got.values())
        text = ", ".join(f"{v} {r:.3f}" + ("" if floor_of(v) == "floor2" else " (/floor1)") for v, r in got.items())
        parts.append((f"{model}: {', '.join(got)} <= {bound:.2f}x floor -> {'PASS' if ok else 'FAIL'} ({text})", ok))
    verdicts = [ok for _, ok in parts if ok is not None]
    overall = "n/a" if not verdicts else "PASS" if all(verdicts) else "FAIL"
    lines.append(f"Goal 1, ratios to the floor (median of the per-run ratios): {overall}")
    lines += [f"  - {text}" for text, _ in parts]
    parts2 = []
    for model, entry in results.items():
        table = entry["summary"]["cycle"]
        if "sam" in table and PTO in table:
            sam, pto = table["sam"]["runs_ms"], table[PTO]["runs_ms"]
            ratio = statistics.median(a / b for a, b in zip(sam, pto))
            text = (
                f"{model}: sam / pytorch_optimizer SAM = {ratio:.3f} ({min(sam):.2f} vs {min(pto):.2f} ms, best runs)"
            )
            parts2.append((text, ratio < 1))
    verdicts = [ok for _, ok in parts2]
    overall = "n/a" if not verdicts else "PASS" if all(verdicts) else "FAIL"
    lines.append(f"Goal 2, sam faster than pytorch_optimizer's SAM in the same run: {overall}")
    lines += [f"  - {text} -> {'PASS' if ok else 'FAIL'}" for text, ok in parts2]
    return lines


def print_report(results: dict[str, Any], methods: list[str], variants: list[str], env: dict[str, Any]) -> None:
    cuda = env["device"] != "cpu"
    clock = env["clock"]
    print(
        f"\n### Per-step cost, {clock} time: method / floor2, median (min..max) of the ratios of {env['repeats']} "
        "lockstep runs; floor2 in ms, best (best..worst run)\n"
    )
    print(main_table(results, methods, "cycle"))
    print(
        "\n† no second pass (BAR): its natural floor is floor1 (plain Lightning), see its own column. "
        f"‡ LookSAM k={LOOKSAM_K}: one SAM step per {LOOKSAM_K}, the mean step of whole cycles.\n"
    )
    for line in goal_checks(results, variants):
        print(line)
    print(f"\n### ms per step ({clock}), best run (best..worst run)\n")
    print(ms_table(results, methods, "cycle", cuda))
    print("\n### The same ratios, window only (on_train_batch_start to on_train_batch_end: no end-of-batch logging)\n")
    print(main_table(results, methods, "window"))
    notes = []
    for name, entry in results.items():
        for m, n in entry["summary"]["notes"].items():
            notes.append(f"{name} {m}: " + ", ".join(f"{k}={v}" for k, v in n.items()))
        notes += [f"{name}: {w}" for w in entry["warnings"]]
    if notes:
        print("\nnotes: " + "; ".join(notes))


# ---------------------------------------------------------------------------------------------------- profile


class ProfileWindow(Callback):
    """Enables ``profiler`` from the batch start of step ``first`` to the batch start of step ``stop``."""

    def __init__(self, profiler: cProfile.Profile, first: int, stop: int) -> None:
        self.profiler, self.first, self.stop, self.seen = profiler, first, stop, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.seen == self.first:
            self.profiler.enable()
        elif self.seen == self.stop:
            self.profiler.disable()
        self.seen += 1


class ProfileHook(Callback):
    """Puts ``profiler`` around every later callback's ``on_before_optimizer_step`` in steps ``first..stop-1`` (it
    wraps them at ``on_fit_start``; Lightning looks the hook up on the instance at each call)."""

    def __init__(self, profiler: cProfile.Profile, first: int, stop: int) -> None:
        self.profiler, self.first, self.stop, self.steps = profiler, first, stop, 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.callbacks[trainer.callbacks.index(self) + 1 :]:  # type: ignore[attr-defined]
            hook = callback.on_before_optimizer_step

            def profiled(*args: Any, hook: Callable[..., Any] = hook) -> Any:
                if not self.first <= self.steps < self.stop:
                    return hook(*args)
                self.profiler.enable()
                try:
                    return hook(*args)
                finally:
                    self.profiler.disable()

            callback.on_before_optimizer_step = profiled  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.steps += 1


LOGGING_PATH = r"\(log|log_metrics|result\.py|logger_connector|apply_to_collection|_ResultMetric"


def profile(method: str, spec: wl.ModelSpec, device: torch.device, args: argparse.Namespace, precision: Any) -> None:
    """cProfile of ``--steps`` timed steps of ``method`` (after ``--warmup``): the whole cycle, then only inside
    ``on_before_optimizer_step`` of its callbacks; each also restricted to Lightning's logging path."""
    batch = wl.make_batch(spec, device)
    fit(method, spec, device, batch, args.warmup, 2, precision)  # first-call costs
    whole = cProfile.Profile()
    window = ProfileWindow(whole, args.warmup, args.warmup + args.steps)
    fit(method, spec, device, batch, args.warmup, args.steps, precision, [window])
    hook = cProfile.Profile()
    fit(
        method,
        spec,
        device,
        batch,
        args.warmup,
        args.steps,
        precision,
        [ProfileHook(hook, args.warmup, args.warmup + args.steps)],
    )
    what = f"{method} on {spec.name}, {args.steps} steps"
    timing.print_profile(whole, f"cProfile of {what}: whole steps", cumulative=40, tottime=25)
    timing.print_profile(
        whole, "the same, Lightning's logging path only", cumulative=25, tottime=0, restrict=(LOGGING_PATH,)
    )
    timing.print_profile(hook, f"cProfile of {what}: inside on_before_optimizer_step", cumulative=40, tottime=25)


def measure(
    spec: wl.ModelSpec, methods: list[str], device: torch.device, args: argparse.Namespace, precision: Any, clock: str
) -> dict[str, Any]:
    """The lockstep repeats of every method on one model, summarized. A method that cannot run here (an error in its
    fit) is left out with the reason, not the whole benchmark."""
    batch = wl.make_batch(spec, device)
    active = list(methods)

    def repeat(shift: int) -> dict[str, Run]:
        order = active[shift % len(active) :] + active[: shift % len(active)]
        results = lockstep(
            order, lambda m, baton: fit(m, spec, device, batch, args.warmup, args.steps, precision, None, baton)
        )
        for m, result in results.items():
            if isinstance(result, Exception):
                print(f"[{spec.name}] {m} left out: {type(result).__name__}: {result}", flush=True)
                active.remove(m)
        return {m: r for m, r in results.items() if isinstance(r, Run)}

    if not args.quick:
        repeat(0)  # untimed: see "Noise" in the module doc
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m, run in repeat(r).items():
            runs[m].append(run)
        values = {m: run_value(rs[-1].times.get(clock, True), PERIOD.get(m, 1)) for m, rs in runs.items() if rs}
        text = ", ".join(f"{m} {v * 1e3:.2f}" for m, v in values.items() if m in active)
        print(f"[{spec.name} repeat {r + 1}/{args.repeats}] {clock} ms/step: {text}", flush=True)
    runs = {m: rs for m, rs in runs.items() if m in active}
    peaks: dict[str, float] = {}
    if device.type == "cuda":  # one method at a time: the peak is the device's, not a thread's
        for m in list(runs):
            peak = fit(m, spec, device, batch, args.warmup, 2, precision).times.peak_mb
            if peak is not None:
                peaks[m] = peak
    notes = sorted({w for m, rs in runs.items() for r in rs if (w := check_schedule(m, r, PERIOD.get(m, 1)))})
    for w in notes:
        print(f"[{spec.name}] warning: {w}", flush=True)
    return {
        "description": spec.description,
        "tensors": wl.tensor_count(spec),
        "batch": spec.batch,
        "parameters": wl.param_count(spec),
        "methods": list(runs),
        "summary": summarize(runs, clock, peaks),
        "warnings": notes,
    }


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models = {name: wl.ALL_MODELS[name] for name in ("cnn", "mlp48", "mlp", "resnet18", "vit_s16")}
    # many short runs rather than a few long ones: on a shared machine slow phases last minutes, and the best-of
    # needs each method to meet a quiet one
    timing.add_common_args(parser, models, default_models="cnn,mlp48", steps=20, warmup=5, repeats=7)
    parser.add_argument(
        "--variants", default="all", help="comma-separated subset of: " + ",".join(variant_names()) + "; or 'all'"
    )
    parser.add_argument("--no-pytorch-optimizer", action="store_true", help="leave pytorch_optimizer's SAM out")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --steps 5 --warmup 2 --repeats 1, no priming fits"
    )
    parser.add_argument(
        "--batch", type=int, help="override every selected model's batch (e.g. a small one for a CPU smoke run)"
    )
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help="auto: cpu on CPU, else wall")
    parser.add_argument("--profile", metavar="METHOD", help="instead of timing, cProfile METHOD's steps and exit")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's trimming on (see timing.keep_freed_memory)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 5, 2, 1
    period = math.lcm(*PERIOD.values()) if PERIOD else 1
    args.steps = -(-max(args.steps, period) // period) * period  # whole LookSAM cycles
    if args.warmup < 2:
        parser.error("--warmup must be >= 2 (SSAM's Fisher pass and XSAM's search run in the warm-up)")

    timing.quiet()
    device = timing.setup(args.threads, args.device)
    malloc = "default" if args.default_malloc or not timing.keep_freed_memory() else "kept"
    precision = "bf16-mixed" if device.type == "cuda" else None
    clock = ("cpu" if device.type == "cpu" else "wall") if args.clock == "auto" else args.clock
    specs = [models[x] for x in timing.selected(args.models, list(models), "models")]
    if args.batch is not None:
        if args.batch < 1:
            parser.error("--batch must be >= 1")
        specs = [dataclasses.replace(spec, batch=args.batch) for spec in specs]
    variants = timing.selected(args.variants, variant_names(), "variants")
    fisher_steps = max((-(-SSAM_SAMPLES // spec.batch) for spec in specs), default=1)
    if "ssam" in variants and args.warmup < fisher_steps:
        print(f"--warmup {args.warmup} -> {fisher_steps}: SSAM's {SSAM_SAMPLES}-sample Fisher pass in the warm-up")
        args.warmup = fisher_steps
    if pytorch_optimizer is None and not args.no_pytorch_optimizer:
        print("pytorch_optimizer is not installed: its SAM is left out (as with --no-pytorch-optimizer)")
        args.no_pytorch_optimizer = True
    methods = ["floor2", "floor1", *([] if args.no_pytorch_optimizer else [PTO]), *variants]

    if args.profile:
        for spec in specs:
            profile(args.profile, spec, device, args, precision)
        return {}

    env = timing.environment(
        device,
        clock=clock,
        precision=precision or "32-true",
        malloc=malloc,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        pytorch_optimizer=importlib.metadata.version("pytorch_optimizer") if pytorch_optimizer else "not installed",
    )
    timing.print_env(env)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for spec in specs:
        results[spec.name] = measure(spec, methods, device, args, precision, clock)
    elapsed = time.perf_counter() - started
    shown_everywhere = [m for m in methods if all(m in r["methods"] for r in results.values())]
    print_report(results, shown_everywhere, [v for v in variants if v in shown_everywhere], env)
    return timing.finish(env, elapsed, results, args.json)


if __name__ == "__main__":
    main()
