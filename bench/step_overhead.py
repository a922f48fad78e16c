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

Lightning steps are timed by a callback (first in the callback list) from ``on_train_batch_start`` to
``on_train_batch_end`` ("window": training_step, backward, SAM's pass 2 in ``on_before_optimizer_step``,
``optimizer.step``, zero_grad). The "cycle" (``on_train_batch_start`` to the next one) also includes the data
fetch and Lightning's end-of-batch bookkeeping (logged metrics such as ``sam/sharpness``).

Noise handling: the methods are interleaved (repeat r runs every method once, in order), each run does
``--warmup`` untimed steps then ``--steps`` timed ones; a run's value is its median step time, and the reported
value is the median over ``--repeats`` runs, with the min..max of the run medians as the spread.

Fair comparison of the Lightning rows: Lightning's own per-step overhead is in both lightning rows, so the
"fair" ratio is ``lightning_sam / (lightning_plain + (floor2 - plain))``: plain Lightning plus exactly one extra
forward/backward. 1.00 means the callback costs nothing beyond SAM's unavoidable second pass.

Memory: with ``--device cuda`` the peak ``torch.cuda.max_memory_allocated`` of each run is reported. On CPU there
is no reliable per-run peak for torch tensors (the allocator and ``ru_maxrss`` are process-wide), so only wall
time is reported; the table lists the parameter size instead, which is the persistent extra memory of
``SAMEngine`` (one saved copy of the weights).

Threads: ``torch.set_num_threads(--threads)`` (default 2, the size of the reference machine).

Usage::

    python bench/step_overhead.py                                  # defaults: cnn,mlp, CPU, ~1-3 min on 2 cores
    python bench/step_overhead.py --device cuda --json out.json
    python bench/step_overhead.py --profile lightning_sam --models cnn   # cProfile of the callback's step
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

METHODS = [
    "plain",
    "floor2",
    "engine_sam",
    "engine_asam",
    "lightning_plain",
    "lightning_sam",
    "lightning_asam",
]
LR = 0.01

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


@dataclass
class RunResult:
    step_s: list[float]  # timed steps of one run
    cycle_s: list[float] = field(default_factory=list)  # Lightning only: batch start to next batch start
    peak_mb: float | None = None


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
        engine = SAMEngine(model.named_parameters(), variant=method.removeprefix("engine_"))

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
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return RunResult(times, peak_mb=read_peak(device))


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
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.sync()
        self.ends.append(time.perf_counter())


def make_trainer(device: torch.device, steps: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
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
    window = [timer.ends[i] - timer.starts[i] for i in range(warmup, warmup + steps)]
    cycle = [timer.starts[i + 1] - timer.starts[i] for i in range(warmup, warmup + steps)]
    return RunResult(window, cycle, read_peak(device))


def run_method(
    method: str, spec: ModelSpec, device: torch.device, warmup: int, steps: int, batch: tuple[Tensor, Tensor]
) -> RunResult:
    runner = run_lightning if method.startswith("lightning_") else run_plain
    return runner(method, spec, device, warmup, steps, batch)


# ---------------------------------------------------------------------------------------------------- results


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    medians = [statistics.median(r.step_s) * 1e3 for r in runs]
    out: dict[str, Any] = {
        "ms": statistics.median(medians),
        "ms_min": min(medians),
        "ms_max": max(medians),
        "run_medians_ms": medians,
    }
    if runs[0].cycle_s:
        cycles = [statistics.median(r.cycle_s) * 1e3 for r in runs]
        out.update(cycle_ms=statistics.median(cycles), cycle_run_medians_ms=cycles)
    peaks = [r.peak_mb for r in runs if r.peak_mb is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    return out


def ratios(s: dict[str, dict[str, Any]], key: str = "ms") -> dict[str, float]:
    def v(method: str) -> float:
        return s[method]["cycle_ms" if key == "cycle" and "cycle_ms" in s[method] else "ms"]

    extra_pass = v("floor2") - v("plain")
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
    return out


def fmt_ms(entry: dict[str, Any]) -> str:
    return f"{entry['ms']:.2f} ({entry['ms_min']:.2f}..{entry['ms_max']:.2f})"


def print_tables(results: dict[str, dict[str, Any]], device: torch.device) -> None:
    models = list(results)
    print()
    print("Median ms/step (min..max of the per-run medians)")
    print()
    print("| method | " + " | ".join(models) + " |")
    print("| --- | " + " | ".join("---:" for _ in models) + " |")
    for method in METHODS:
        print(f"| {method} | " + " | ".join(fmt_ms(results[m]["methods"][method]) for m in models) + " |")
    print()
    print("Lightning cycle (on_train_batch_start to the next one, incl. data fetch and logging bookkeeping), ms")
    print()
    print("| method | " + " | ".join(models) + " |")
    print("| --- | " + " | ".join("---:" for _ in models) + " |")
    for method in METHODS:
        if method.startswith("lightning_"):
            print(f"| {method} | " + " | ".join(f"{results[m]['methods'][method]['cycle_ms']:.2f}" for m in models) + " |")
    print()
    print("Ratios (window / cycle for the Lightning rows)")
    print()
    print("| ratio | " + " | ".join(models) + " |")
    print("| --- | " + " | ".join("---:" for _ in models) + " |")
    for name in results[models[0]]["ratios"]:
        cells = []
        for m in models:
            a, b = results[m]["ratios"][name], results[m]["ratios_cycle"][name]
            cells.append(f"{a:.2f}" if "lightning" not in name else f"{a:.2f} / {b:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    if device.type == "cuda":
        print("Peak CUDA memory (torch.cuda.max_memory_allocated), MiB")
        print()
        print("| method | " + " | ".join(models) + " |")
        print("| --- | " + " | ".join("---:" for _ in models) + " |")
        for method in METHODS:
            print(f"| {method} | " + " | ".join(f"{results[m]['methods'][method]['peak_mb']:.1f}" for m in models) + " |")
    else:
        print("Memory: CPU run, wall time only (no per-run peak for torch tensors on CPU). SAMEngine's persistent")
        print("extra memory is one copy of the trained weights: " + ", ".join(
            f"{m} {results[m]['param_mb']:.2f} MiB" for m in models
        ))


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


# ---------------------------------------------------------------------------------------------------- main


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*max_epochs.*")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each run (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method, interleaved (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (ratios need all)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", metavar="METHOD", help="instead of timing, cProfile METHOD's steps and exit")
    args = parser.parse_args(argv)

    quiet()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        torch.backends.cudnn.benchmark = True
    models = [MODELS[m] for m in args.models.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {METHODS}")

    if args.profile:
        for spec in models:
            profile(args.profile, spec, device, args.steps, make_batch(spec, device))
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
        runs: dict[str, list[RunResult]] = {m: [] for m in methods}
        for repeat in range(args.repeats):
            for method in methods:
                runs[method].append(run_method(method, spec, device, args.warmup, args.steps, batch))
            line = ", ".join(f"{m} {statistics.median(runs[m][-1].step_s) * 1e3:.2f}" for m in methods)
            print(f"[{spec.name} repeat {repeat + 1}/{args.repeats}] ms: {line}", flush=True)
        summary = {m: summarize(r) for m, r in runs.items()}
        results[spec.name] = {
            "description": spec.description,
            "param_mb": param_megabytes(make_model(spec, device)),
            "methods": summary,
        }
        if set(METHODS) <= set(methods):
            results[spec.name]["ratios"] = ratios(summary)
            results[spec.name]["ratios_cycle"] = ratios(summary, "cycle")
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
