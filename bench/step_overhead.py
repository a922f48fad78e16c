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
import io
import json
import logging
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_sam import SAMCallback, SAMEngine
from lightning_sam.batches import batchnorm_in_eval

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
LR = 0.01
NEVER = 10**9  # a refresh period longer than any run

# ---------------------------------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    description: str = ""


def build_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        nn.MaxPool2d(2),  # 16x16
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def build_mlp(depth: int = 10, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS = {
    "cnn": ModelSpec(
        "cnn", build_cnn, (3, 32, 32), 64, description="3x(conv3x3+BN+ReLU) 16/32/64 ch + linear, 3x32x32, batch 64"
    ),
    "mlp": ModelSpec("mlp", build_mlp, (256,), 128, description="10 Linear layers, width 256, ReLU, batch 128"),
}


def make_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device)


def make_batch(spec: ModelSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(spec.batch, *spec.input_shape, generator=generator)
    y = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
    return x.to(device), y.to(device)


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def param_megabytes(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# ---------------------------------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def clocks() -> tuple[float, float]:
    """(wall, process CPU) time in seconds."""
    return time.perf_counter(), time.process_time()


@dataclass
class RunResult:
    """Per-step times of one run, in seconds: wall clock and process CPU time."""

    wall_s: list[float]
    cpu_s: list[float]
    cycle_wall_s: list[float] = field(default_factory=list)  # Lightning only: batch start to next batch start
    cycle_cpu_s: list[float] = field(default_factory=list)
    peak_mb: float | None = None


def build_fisher_mask(engine: SAMEngine, model: nn.Module, batch: tuple[Tensor, Tensor]) -> int:
    """Feed SSAM's Fisher from ``batch`` (repeatedly if it is smaller than ``num_samples``) until the mask exists.

    Runs as the callback's Fisher passes do (BatchNorm on its running statistics). Returns the passes made.
    """
    x, y = batch
    calls = 0
    with batchnorm_in_eval(model):
        while not engine.needs_second_pass():  # (at step 0 a finished refresh would start the next one)
            if not engine.collect_samples(lambda i, j: F.cross_entropy(model(x[i:j]), y[i:j]), x.shape[0]):
                raise RuntimeError("the Fisher mask was not built")
            calls += 1
    return calls


def make_engine(model: nn.Module, variant: str, **options: Any) -> SAMEngine:
    if variant == "ssam":
        options.setdefault("mask_every", NEVER)  # steady-state steps only: no refresh inside a run
    return SAMEngine(model.named_parameters(), variant=variant, **options)


def plain_loop_step(method: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """One training step of ``method`` as a closure over a fresh optimizer (and engine)."""
    x, y = batch
    optimizer = make_optimizer(model.parameters())

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
            build_fisher_mask(engine, model, batch)

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
    method: str, spec: ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    model = make_model(spec, device).train()
    step = plain_loop_step(method, model, batch)
    sync = synchronizer(device)
    reset_peak(device)
    for _ in range(warmup):
        step()
    sync()
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = clocks()
        step()
        sync()
        w1, c1 = clocks()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return RunResult(wall, cpu, peak_mb=read_peak(device))


class BenchModule(L.LightningModule):
    """The same network as a LightningModule: nothing but training_step and configure_optimizers."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


class SameBatch(Dataset):
    """``n`` copies of one pre-built batch (used with ``batch_size=None``: no collation)."""

    def __init__(self, batch: tuple[Tensor, Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batch


class StepTimer(Callback):
    """Timestamps of on_train_batch_start / on_train_batch_end (put first in the callback list)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.starts: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.sync()
        self.starts.append(clocks())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.sync()
        self.ends.append(clocks())


def make_trainer(device: torch.device, steps: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        max_epochs=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def lightning_callbacks(method: str) -> list[Callback]:
    if method == "lightning_plain":
        return []
    return [SAMCallback(variant=method.removeprefix("lightning_"))]


def run_lightning(
    method: str, spec: ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    total = warmup + steps + 1  # +1: the last timed step's cycle ends at the next batch start
    module = BenchModule(make_model(spec, device))
    timer = StepTimer(synchronizer(device))
    trainer = make_trainer(device, total, [timer, *lightning_callbacks(method)])
    loader = DataLoader(SameBatch(batch, total), batch_size=None)
    reset_peak(device)
    trainer.fit(module, train_dataloaders=loader)
    if len(timer.ends) != total:
        raise RuntimeError(f"{method}: expected {total} steps, timed {len(timer.ends)}")
    timed = range(warmup, warmup + steps)
    s, e = timer.starts, timer.ends
    return RunResult(
        wall_s=[e[i][0] - s[i][0] for i in timed],
        cpu_s=[e[i][1] - s[i][1] for i in timed],
        cycle_wall_s=[s[i + 1][0] - s[i][0] for i in timed],
        cycle_cpu_s=[s[i + 1][1] - s[i][1] for i in timed],
        peak_mb=read_peak(device),
    )


def run_method(
    method: str, spec: ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    runner = run_lightning if method.startswith("lightning_") else run_plain
    return runner(method, spec, device, warmup, steps, batch)


# ---------------------------------------------------------------------------------------------------- results


def _stats(per_run: list[list[float]]) -> dict[str, Any]:
    medians = [statistics.median(run) * 1e3 for run in per_run]
    return {"ms": statistics.median(medians), "min": min(medians), "max": max(medians), "run_medians": medians}


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Per clock: the median of the per-run median step times, and the min/max of those run medians (ms)."""
    out: dict[str, Any] = {"wall": _stats([r.wall_s for r in runs]), "cpu": _stats([r.cpu_s for r in runs])}
    if runs[0].cycle_wall_s:
        out["cycle_wall"] = _stats([r.cycle_wall_s for r in runs])
        out["cycle_cpu"] = _stats([r.cycle_cpu_s for r in runs])
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


def fmt_ms(stats: dict[str, Any]) -> str:
    return f"{stats['ms']:.2f} ({stats['min']:.2f}..{stats['max']:.2f})"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(results: dict[str, dict[str, Any]], device: torch.device) -> None:
    models = list(results)
    clocks_shown = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    entry = {x: results[x]["methods"] for x in models}
    header = ["method"] + [f"{x} {c} ms" for x in models for c in clocks_shown]
    print("\nms/step: median of the per-run medians (min..max of the per-run medians); cpu = process CPU time\n")
    shown = [m for m in METHODS if m in entry[models[0]]]
    rows = [[m] + [fmt_ms(entry[x][m][c]) for x in models for c in clocks_shown] for m in shown]
    print(md_table(header, rows))
    print("\nLightning cycle (on_train_batch_start to the next one: adds data fetch and end-of-batch logging), ms\n")
    rows = [
        [m] + [fmt_ms(entry[x][m][f"cycle_{c}"]) for x in models for c in clocks_shown]
        for m in shown
        if m.startswith("lightning_")
    ]
    print(md_table(header, rows))
    print("\nRatios of the median step times (" + " / ".join(clocks_shown) + ")\n")
    names = list(results[models[0]]["ratios"]["wall"])
    rows = [
        [name] + [" / ".join(f"{results[x]['ratios'][c][name]:.2f}" for c in clocks_shown) for x in models]
        for name in names
    ]
    print(md_table(["ratio", *models], rows))
    print()
    if device.type == "cuda":
        print("Peak CUDA memory (torch.cuda.max_memory_allocated), MiB\n")
        print(md_table(["method", *models], [[m] + [f"{entry[x][m]['peak_mb']:.1f}" for x in models] for m in shown]))
    else:
        sizes = ", ".join(f"{x} {results[x]['param_mb']:.2f} MiB" for x in models)
        print("Memory: CPU run, time only (no per-run peak for torch tensors on CPU). SAMEngine's persistent")
        print(f"extra memory is one saved copy of the trained weights: {sizes}.")


# ---------------------------------------------------------------------------------------------------- profile


def profile(method: str, spec: ModelSpec, device: torch.device, steps: int, batch: tuple[Tensor, Tensor]) -> None:
    """cProfile of ``steps`` Lightning steps (after a short warm-up fit), top functions by cumulative time."""
    run_method(method, spec, device, 3, 3, batch)  # warm-up (imports, first-call costs)
    profiler = cProfile.Profile()
    profiler.enable()
    run_method(method, spec, device, 0, steps, batch)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("cumulative")
    stats.print_stats(45)
    print(f"--- cProfile of {method} on {spec.name}: {steps} steps (includes Trainer setup/teardown) ---")
    print(stream.getvalue())
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("tottime").print_stats(25)
    print(stream.getvalue())


# ---------------------------------------------------------------------------------------------------- breakdown

BREAKDOWN_TARGETS = [
    ("SAMCallback.on_before_optimizer_step", "lightning_sam.callback", "SAMCallback", "on_before_optimizer_step"),
    ("  SAMCallback._run_second_pass", "lightning_sam.callback", "SAMCallback", "_run_second_pass"),
    ("    LightningModule.training_step", None, None, "training_step"),
    ("    Strategy.backward", "lightning.pytorch.strategies.strategy", "Strategy", "backward"),
    ("  SAMEngine.ascend", "lightning_sam.engine", "SAMEngine", "ascend"),
    ("  SAMEngine.descend", "lightning_sam.engine", "SAMEngine", "descend"),
    ("  SAMCallback._log", "lightning_sam.callback", "SAMCallback", "_log"),
    ("SAMCallback.on_train_batch_start", "lightning_sam.callback", "SAMCallback", "on_train_batch_start"),
    ("SAMCallback.on_before_backward", "lightning_sam.callback", "SAMCallback", "on_before_backward"),
]


def breakdown(method: str, spec: ModelSpec, device: torch.device, steps: int, batch: tuple[Tensor, Tensor]) -> None:
    """Wall and CPU time per step inside the callback's phases, by wrapping them with timers (no profiler).

    Private methods that the library may rename are skipped when missing. Only meaningful on CPU or with a
    synchronizing device (the wrappers synchronize on CUDA, which slows the step a little).
    """
    import importlib

    sync = synchronizer(device)
    totals: dict[str, list[float]] = {}  # label -> [wall s, cpu s]
    calls: dict[str, int] = {}
    restore: list[tuple[Any, str, Any]] = []

    def wrap(label: str, owner: Any, attr: str) -> None:
        original = owner.__dict__.get(attr)
        if original is None:
            print(f"(breakdown: {label} not found, skipped)")
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            w0, c0 = clocks()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                w1, c1 = clocks()
                total = totals.setdefault(label, [0.0, 0.0])
                total[0] += w1 - w0
                total[1] += c1 - c0
                calls[label] = calls.get(label, 0) + 1

        setattr(owner, attr, timed)
        restore.append((owner, attr, original))

    for label, module_name, class_name, attr in BREAKDOWN_TARGETS:
        if module_name is None:
            wrap(label, BenchModule, attr)
        else:
            owner = getattr(importlib.import_module(module_name), class_name, None)
            if owner is not None:
                wrap(label, owner, attr)
    try:
        run_method(method, spec, device, 3, 3, batch)  # warm-up
        totals.clear()
        calls.clear()
        result = run_method(method, spec, device, 0, steps, batch)
    finally:
        for owner, attr, original in reversed(restore):
            setattr(owner, attr, original)
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


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*max_epochs.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10, not ours


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each run (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method, interleaved (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument(
        "--methods",
        default=",".join(BASE_METHODS),
        help="comma-separated subset of: "
        + ",".join(METHODS)
        + "; or 'all' (default: all but the optional "
        + ",".join(EXTRA_METHODS)
        + "; ratios need every default row)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see module doc)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", metavar="METHOD", help="instead of timing, cProfile METHOD's steps and exit")
    parser.add_argument(
        "--breakdown", metavar="METHOD", help="instead of timing, time the SAM phases inside METHOD's steps and exit"
    )
    args = parser.parse_args(argv)

    quiet()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        torch.backends.cudnn.benchmark = True
    models = [MODELS[m] for m in args.models.split(",")]
    methods = METHODS if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {METHODS}")

    if args.profile:
        for spec in models:
            profile(args.profile, spec, device, args.steps, make_batch(spec, device))
        return {}
    if args.breakdown:
        for spec in models:
            breakdown(args.breakdown, spec, device, args.steps, make_batch(spec, device))
        return {}

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for spec in models:
        batch = make_batch(spec, device)
        for method in methods:  # prime: first-call costs (oneDNN primitives, Trainer imports) are not timed
            run_method(method, spec, device, args.warmup, 1, batch)
        runs: dict[str, list[RunResult]] = {m: [] for m in methods}
        for repeat in range(args.repeats):
            for method in methods:
                runs[method].append(run_method(method, spec, device, args.warmup, args.steps, batch))
            last = {m: runs[m][-1] for m in methods}
            line = ", ".join(
                f"{m} {statistics.median(r.wall_s) * 1e3:.1f}/{statistics.median(r.cpu_s) * 1e3:.1f}"
                for m, r in last.items()
            )
            print(f"[{spec.name} repeat {repeat + 1}/{args.repeats}] wall/cpu ms: {line}", flush=True)
        summary = {m: summarize(r) for m, r in runs.items()}
        results[spec.name] = {
            "description": spec.description,
            "param_mb": param_megabytes(make_model(spec, device)),
            "methods": summary,
        }
        if set(BASE_METHODS) <= set(methods):
            shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
            results[spec.name]["ratios"] = {c: ratios(summary, c) for c in shown}
    elapsed = time.perf_counter() - t_start
    if all("ratios" in r for r in results.values()):
        print_tables(results, device)
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    out = {"env": env, "elapsed_s": elapsed, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
