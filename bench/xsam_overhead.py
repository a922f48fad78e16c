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
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_sam import SAMCallback, SAMEngine
from lightning_sam.variants.xsam import XSAM

LR = 0.01
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
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
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


def make_batches(spec: ModelSpec, device: torch.device, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` distinct synthetic batches (one epoch), built once per model."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(spec.batch, *spec.input_shape, generator=generator)
        y = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
        out.append((x.to(device), y.to(device)))
    return out


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def param_count(spec: ModelSpec) -> int:
    return sum(p.numel() for p in spec.build().parameters())


# ---------------------------------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def clocks() -> tuple[float, float]:
    """(wall, process CPU) time in seconds."""
    return time.perf_counter(), time.process_time()


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


class SearchTimer:
    """Wraps ``XSAM._search`` and ``XSAM.descent_`` (for the whole benchmark).

    ``records``: (wall, CPU, alpha chosen) of each search. ``descents``: (wall, CPU) of each ``descent_`` call
    that did not search (the per-step work of XSAM: the explicit descent direction).
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.records: list[tuple[float, float, float]] = []
        self.descents: list[tuple[float, float]] = []

    def clear(self) -> None:
        self.records.clear()
        self.descents.clear()

    @contextmanager
    def installed(self) -> Iterator[SearchTimer]:
        search, descent = XSAM._search, XSAM.descent_
        timer = self

        def timed_search(variant: XSAM, step: Any, theta: Tensor) -> None:
            timer.sync()
            w0, c0 = clocks()
            try:
                search(variant, step, theta)
            finally:
                timer.sync()
                w1, c1 = clocks()
                timer.records.append((w1 - w0, c1 - c0, variant.alpha))

        def timed_descent(variant: XSAM, step: Any) -> None:
            searches = len(timer.records)
            timer.sync()
            w0, c0 = clocks()
            descent(variant, step)
            timer.sync()
            w1, c1 = clocks()
            if len(timer.records) == searches:
                timer.descents.append((w1 - w0, c1 - c0))

        XSAM._search = timed_search  # type: ignore[method-assign]
        XSAM.descent_ = timed_descent  # type: ignore[method-assign]
        try:
            yield self
        finally:
            XSAM._search, XSAM.descent_ = search, descent  # type: ignore[method-assign]


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
    spec: ModelSpec,
    device: torch.device,
    batches: list[tuple[Tensor, Tensor]],
    warmup_epochs: int,
    epochs: int,
    timer: SearchTimer,
) -> RunResult:
    _, variant, options = split_method(method)
    model = make_model(spec, device).train()
    optimizer = make_optimizer(model.parameters())
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
    sync = synchronizer(device)
    result = RunResult()
    timer.clear()
    for epoch in range(warmup_epochs + epochs):
        timed = epoch >= warmup_epochs
        sync()
        e0 = clocks()
        for i, batch in enumerate(batches):
            current[0] = batch
            s0 = clocks()
            engine.step(closure, optimizer, probe=probe)
            sync()
            s1 = clocks()
            if timed and i > 0:  # step 0 of an epoch is the search step of the XSAM rows
                result.step_wall.append(s1[0] - s0[0])
                result.step_cpu.append(s1[1] - s0[1])
        e1 = clocks()
        if timed:
            result.epoch_wall.append(e1[0] - e0[0])
            result.epoch_cpu.append(e1[1] - e0[1])
    fill_searches(result, timer, warmup_epochs, len(batches))
    return result


# ---------------------------------------------------------------------------------------------------- lightning


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


class Batches(Dataset):
    """Pre-built batches (used with ``batch_size=None``: no collation)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index]


class EpochTimer(Callback):
    """Clock readings at epoch and batch boundaries (put first in the callback list)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.epochs: list[tuple[tuple[float, float], tuple[float, float]]] = []
        self.steps: list[tuple[int, int, tuple[float, float], tuple[float, float]]] = []
        self._epoch_start = (0.0, 0.0)
        self._step_start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self._epoch_start = clocks()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self.epochs.append((self._epoch_start, clocks()))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.sync()
        self._step_start = clocks()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, idx: int) -> None:
        self.sync()
        self.steps.append((trainer.current_epoch, idx, self._step_start, clocks()))


def run_lightning(
    method: str,
    spec: ModelSpec,
    device: torch.device,
    batches: list[tuple[Tensor, Tensor]],
    warmup_epochs: int,
    epochs: int,
    timer: SearchTimer,
) -> RunResult:
    _, variant, options = split_method(method)
    module = BenchModule(make_model(spec, device))
    epoch_timer = EpochTimer(synchronizer(device))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        max_epochs=warmup_epochs + epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[epoch_timer, SAMCallback(variant, **options)],
    )
    timer.clear()
    trainer.fit(module, train_dataloaders=DataLoader(Batches(batches), batch_size=None))
    if len(epoch_timer.epochs) != warmup_epochs + epochs:
        raise RuntimeError(f"{method}: expected {warmup_epochs + epochs} epochs, timed {len(epoch_timer.epochs)}")
    result = RunResult()
    for start, end in epoch_timer.epochs[warmup_epochs:]:
        result.epoch_wall.append(end[0] - start[0])
        result.epoch_cpu.append(end[1] - start[1])
    for epoch, idx, start, end in epoch_timer.steps:
        if epoch >= warmup_epochs and idx > 0:
            result.step_wall.append(end[0] - start[0])
            result.step_cpu.append(end[1] - start[1])
    fill_searches(result, timer, warmup_epochs, len(batches))
    return result


def run_method(
    method: str,
    spec: ModelSpec,
    device: torch.device,
    batches: list[tuple[Tensor, Tensor]],
    warmup_epochs: int,
    epochs: int,
    timer: SearchTimer,
) -> RunResult:
    runner = run_lightning if method.startswith("lightning_") else run_engine
    return runner(method, spec, device, batches, warmup_epochs, epochs, timer)


# ---------------------------------------------------------------------------------------------------- results


def _stats(per_run: list[list[float]]) -> dict[str, Any] | None:
    """Median over runs of each run's median (ms), with the min..max of the run medians."""
    if not per_run or not all(per_run):
        return None
    medians = [statistics.median(run) * 1e3 for run in per_run]
    return {"ms": statistics.median(medians), "min": min(medians), "max": max(medians), "run_medians": medians}


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        out[f"epoch_{clock}"] = _stats([getattr(r, f"epoch_{clock}") for r in runs])
        out[f"step_{clock}"] = _stats([getattr(r, f"step_{clock}") for r in runs])
        out[f"search_{clock}"] = _stats([getattr(r, f"search_{clock}") for r in runs])
        out[f"descent_{clock}"] = _stats([getattr(r, f"descent_{clock}") for r in runs])
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


def fmt(stats: dict[str, Any] | None) -> str:
    return "-" if stats is None else f"{stats['ms']:.1f} ({stats['min']:.1f}..{stats['max']:.1f})"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(results: dict[str, dict[str, Any]], methods: list[str], device: torch.device) -> None:
    shown = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    for name, entry in results.items():
        summary = entry["methods"]
        print(f"\n{name}: {entry['description']}; ms, median over runs (min..max of the run medians)\n")
        header = ["method"] + [f"{what} {c}" for what in COLUMNS for c in shown]
        rows = [[m] + [fmt(summary[m].get(f"{what}_{c}")) for what in COLUMNS for c in shown] for m in methods]
        print(md_table(header, rows))
        alphas = {m: sorted({round(a, 2) for a in summary[m]["alphas"]}) for m in methods if summary[m]["alphas"]}
        if alphas:
            print("\nalpha chosen by the timed searches: " + "; ".join(f"{m} {a}" for m, a in alphas.items()))
        print("\nratios (" + " / ".join(shown) + ")\n")
        names = list(entry["ratios"][shown[0]])
        rows = [[n, " / ".join(f"{entry['ratios'][c][n]:.3f}" for c in shown)] for n in names]
        print(md_table(["ratio", name], rows))


def reprint(path: str) -> dict[str, Any]:
    """Print the tables of a ``--json`` file again, with the ratios recomputed by this version of the script."""
    with open(path) as f:
        saved = json.load(f)
    env = saved["env"]
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    device = torch.device(env["device"] if env["device"] == "cpu" else "cuda")
    shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for entry in saved["results"].values():
        entry["ratios"] = {c: ratios(entry["methods"], c, env["steps_per_epoch"]) for c in shown}
    methods = [m for m in METHODS if m in next(iter(saved["results"].values()))["methods"]]
    print_tables(saved["results"], methods, device)
    return saved


# ---------------------------------------------------------------------------------------------------- main


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10, not ours


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before them (default 1)")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="batches per epoch (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated subset of: "
        + ",".join(METHODS)
        + "; or 'all' (default: all but "
        + ",".join(OPTIONAL_METHODS)
        + ")",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--from-json", metavar="PATH", help="re-print the tables of a saved run and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        return reprint(args.from_json)
    if args.epochs < 1 or args.steps_per_epoch < 2 or args.repeats < 1 or args.warmup_epochs < 0:
        sys.exit("need --epochs >= 1, --steps-per-epoch >= 2, --repeats >= 1, --warmup-epochs >= 0")

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

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "repeats": args.repeats,
    }
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    timer = SearchTimer(synchronizer(device))
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with timer.installed():
        for spec in models:
            batches = make_batches(spec, device, args.steps_per_epoch)
            for method in methods:  # prime: first-call costs (oneDNN primitives, Trainer imports) are not timed
                run_method(method, spec, device, batches[:3], 0, 1, timer)
            runs: dict[str, list[RunResult]] = {m: [] for m in methods}
            for repeat in range(args.repeats):
                for method in methods:
                    runs[method].append(
                        run_method(method, spec, device, batches, args.warmup_epochs, args.epochs, timer)
                    )
                line = ", ".join(
                    f"{m} {statistics.median(runs[m][-1].epoch_wall) * 1e3:.0f}/"
                    f"{statistics.median(runs[m][-1].epoch_cpu) * 1e3:.0f}"
                    for m in methods
                )
                print(f"[{spec.name} repeat {repeat + 1}/{args.repeats}] epoch wall/cpu ms: {line}", flush=True)
            summary = {m: summarize(r) for m, r in runs.items()}
            shown = ("wall", "cpu") if device.type == "cpu" else ("wall",)
            results[spec.name] = {
                "description": spec.description,
                "parameters": param_count(spec),
                "methods": summary,
                "ratios": {c: ratios(summary, c, args.steps_per_epoch) for c in shown},
            }
    elapsed = time.perf_counter() - t_start
    print_tables(results, methods, device)
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    out = {"env": env, "elapsed_s": elapsed, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
