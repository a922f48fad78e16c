"""SGD vs SAM and its variants on scikit-learn's digits with noisy labels, each radius chosen on a validation split.

A self-contained first look at ``lightning_sam``: no downloads, one to two minutes on 2 CPU cores.

* Data: the 1,797 8x8 digit images bundled with scikit-learn. One fixed stratified split (``--split-seed``) sets
  540 clean test images apart; they are used for the final report and nothing else. A fraction ``--noise``
  (default 35%) of the 1,257 training labels is flipped to a random other class, and a validation split
  (``--val-fraction``, default 20%) is carved out of that noisy training set, so its labels are noisy too, as they
  would be in practice. No run ever trains on the validation images.
* Model: a small MLP as an ordinary LightningModule (automatic optimization, SGD with Nesterov momentum, weight
  decay, cosine schedule, ``--epochs`` 30). The only difference between the runs is the ``SAMCallback`` in the
  Trainer.
* Methods (``--methods``): ``sgd`` (no callback), ``sam``, ``asam``, ``ssam`` (sparsity ``--ssam-sparsity``,
  Fisher mask refreshed every epoch), ``fsam`` (Friendly SAM) and ``xsam`` (explicit SAM, alpha searched on each
  epoch's first batch) by default; the cheap path is available too: ``sam_interval5`` (a SAM step on every 5th
  optimizer step) and ``looksam`` (k=5, alpha ``--looksam-alpha``).
* Choosing rho: for each method but SGD, one run per radius of the grid (``--grid``, default 0.05 0.1 0.2 0.5 1 2:
  from SAM's usual default up 40-fold; ASAM's radius is relative to the weights, so its grid is ``--asam-scale`` =
  10 times that, 0.5 to 20), on the first seed. The radius with the highest final-epoch accuracy on the noisy
  validation labels wins (ties: the smaller radius). Accuracy rather than loss: with labels flipped uniformly to
  the other classes at a rate below 90%, the expected noisy accuracy is an increasing affine function of the clean
  accuracy, so both have the same argmax; the noisy cross-entropy instead rewards hedging on the flipped labels.
  The test set plays no part in the choice.
* Final runs: every method at its chosen radius on every seed (``--seeds``, default 0 1 2; a seed fixes the label
  noise, the validation split, the initialization and the batch order). The first seed's final run is the sweep's
  run at the chosen radius. Reported: the clean test accuracy after the last epoch, mean over the seeds; and, as
  the classic label-noise baseline, the same runs' clean test accuracy at their epoch of best validation accuracy
  (early stopping, chosen on the noisy validation split too).

Prints the sweep and the results, and writes a plot (validation accuracy per radius, test accuracy and training
accuracy against the noisy labels per epoch) to ``examples/out/digits_label_noise.png`` and the results table to
``digits_label_noise.json`` next to it: a list of rows with ``method``, ``rho`` (the chosen radius; null for
SGD), ``final_test_acc`` (mean over seeds), ``seconds`` (training time of the final runs, summed over seeds),
``sweep_seconds`` (training time of the sweep's other runs; the two add up to the method's total), the per-seed
accuracies, ``early_stop_test_acc`` and the validation accuracy of every swept radius. Runs go to ``--jobs`` worker
processes (default: 2, forked, one torch thread each) on Linux, one after another elsewhere.

Run::

    python examples/digits_label_noise.py                  # sweep + 3 seeds for 6 methods, 1-2 minutes
    python examples/digits_label_noise.py --quick          # 2 epochs, 2-point grid, 2 seeds: a smoke test
    python examples/digits_label_noise.py --methods sgd sam sam_interval5 looksam
    python examples/digits_label_noise.py --no-sweep --rho 0.05   # the defaults, no validation sweep

``train_method(method, noise=..., seed=..., epochs=..., **options)`` trains one run at a fixed radius without
printing anything and returns its ``RunResult`` (per-epoch test accuracy, ``.final``, ``.best``);
``bench/generalization.py`` uses it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAMCallback

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the Agg backend
from matplotlib.ticker import MaxNLocator

NUM_CLASSES = 10
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "digits_label_noise.png"
METHODS = ("sgd", "sam", "asam", "ssam", "fsam", "sam_interval5", "looksam", "xsam")
DEFAULT_METHODS = ("sgd", "sam", "asam", "ssam", "fsam", "xsam")  # the cheap path via --methods
DEFAULT_GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # absolute radii; ASAM's is --asam-scale times this
SAM_INTERVAL = 5  # sam_interval5: SAM on every 5th optimizer step
RELATIVE_COST = {"sgd": 0.5, "ssam": 1.5, "sam_interval5": 0.6, "looksam": 0.6}  # SAM = 1: for scheduling only


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DigitsData:
    """The images (standardized) and labels of one seed's training, validation and test sets."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # noisy labels, what the model is trained on
    y_train_clean: torch.Tensor
    x_val: torch.Tensor  # carved from the noisy training set: used to choose rho
    y_val: torch.Tensor  # noisy, like the training labels
    y_val_clean: torch.Tensor  # for checks only: nothing is chosen by it
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean
    flipped: torch.Tensor  # bool mask over the training set (without the validation split)

    @property
    def noise_rate(self) -> float:
        return float(self.flipped.float().mean())


def make_digits(
    noise: float, seed: int, test_size: float = 0.3, *, val_fraction: float = 0.0, split_seed: int | None = None
) -> DigitsData:
    """Digits split train/test, ``noise`` of the training labels flipped, then a validation split carved out.

    The train/test split is stratified and seeded by ``split_seed`` (default: ``seed``); the label noise and the
    validation split (stratified on the noisy labels) by ``seed``. The standardization statistics come from the
    training split's images (validation included: no labels, and never the test images).
    """
    x, y = load_digits(return_X_y=True)
    split = seed if split_seed is None else split_seed
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=split, stratify=y)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    rng = np.random.default_rng(seed)
    n_flip = round(noise * len(y_train))
    flip = rng.choice(len(y_train), size=n_flip, replace=False)
    y_noisy = y_train.copy()
    # A random *other* class: shift by 1..9 (mod 10), uniform over the nine wrong labels.
    y_noisy[flip] = (y_train[flip] + rng.integers(1, NUM_CLASSES, size=n_flip)) % NUM_CLASSES

    index = np.arange(len(y_train))
    if val_fraction > 0:
        index, val_index = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=y_noisy)
    else:
        val_index = index[:0]

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return DigitsData(
        x_train=as_x(x_train[index]),
        y_train=as_y(y_noisy[index]),
        y_train_clean=as_y(y_train[index]),
        x_val=as_x(x_train[val_index]),
        y_val=as_y(y_noisy[val_index]),
        y_val_clean=as_y(y_train[val_index]),
        x_test=as_x(x_test),
        y_test=as_y(y_test),
        flipped=torch.as_tensor(y_noisy[index] != y_train[index]),
    )


# ---------------------------------------------------------------------------------------------- model
class DigitsMLP(L.LightningModule):
    """A plain LightningModule: nothing in it knows about SAM.

    ``eval_sets`` maps a name to ``(x, y)``; the accuracy on each is recorded after every training epoch (in
    ``eval_history``), on the whole set at once, without a Lightning validation loop.
    """

    def __init__(
        self,
        hidden: int = 256,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["eval_sets"])
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.eval_sets = {name: xy for name, xy in (eval_sets or {}).items() if len(xy[1])}
        self.eval_history: dict[str, list[float]] = {name: [] for name in self.eval_sets}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        self.eval()
        with torch.no_grad():
            for name, (x, y) in self.eval_sets.items():
                self.eval_history[name].append(accuracy(self(x), y))
        self.train()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """One run's curves (one value per epoch) and end-of-training numbers."""

    method: str
    label: str
    rho: float | None = None
    seed: int = 0
    test_acc: list[float] = field(default_factory=list)  # per epoch, clean labels
    val_acc: list[float] = field(default_factory=list)  # per epoch, noisy labels (empty without a validation split)
    train_acc: list[float] = field(default_factory=list)  # per epoch, final weights, against the noisy labels
    train_acc_noisy: float = float("nan")  # final model, against the noisy training labels
    memorized: float = float("nan")  # fraction of flipped training samples predicted as their *wrong* label
    seconds: float = 0.0  # Trainer.fit

    @property
    def final(self) -> float:
        """Clean test accuracy after the last epoch: the honest number."""
        return self.test_acc[-1]

    @property
    def best(self) -> float:
        """Maximum test accuracy over the epochs: an oracle, optimistic by construction."""
        return max(self.test_acc)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.test_acc)) + 1

    @property
    def val_final(self) -> float:
        """Noisy-label validation accuracy after the last epoch: what rho is chosen by."""
        return self.val_acc[-1]

    @property
    def early_stop_epoch(self) -> int:
        """The (first) epoch of highest validation accuracy: early stopping on the noisy validation split."""
        return int(np.argmax(self.val_acc)) + 1

    @property
    def early_stop(self) -> float:
        """Clean test accuracy at :attr:`early_stop_epoch` (chosen on validation, not on the test set)."""
        return self.test_acc[self.early_stop_epoch - 1]


def default_rho(method: str, args: argparse.Namespace) -> float | None:
    """The radius of a run without a sweep: ``--rho``, ``--asam-rho`` or ``--xsam-rho`` (None for SGD)."""
    check_method(method)
    return {"sgd": None, "asam": args.asam_rho, "xsam": args.xsam_rho}.get(method, args.rho)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def method_label(method: str, rho: float | None, args: argparse.Namespace) -> str:
    check_method(method)
    r = f"ρ={rho:g}" if rho is not None else ""
    return {
        "sgd": "SGD",
        "sam": f"SAM {r}",
        "asam": f"ASAM {r}",
        "ssam": f"SSAM {r} s={args.ssam_sparsity:g}",
        "fsam": f"F-SAM {r}",
        "sam_interval5": f"SAM {r} every {SAM_INTERVAL}th step",
        "looksam": f"LookSAM {r} k=5 α={args.looksam_alpha:g}",
        "xsam": f"XSAM {r}",
    }[method]


def sam_callback(method: str, rho: float | None, args: argparse.Namespace) -> SAMCallback | None:
    """The only thing that differs between the runs: the callback (None for plain SGD)."""
    check_method(method)
    if method == "sgd":
        return None
    if method == "ssam":  # Fisher mask (default) from 128 training samples, refreshed every epoch
        return SAMCallback(variant="ssam", rho=rho, sparsity=args.ssam_sparsity)
    if method == "sam_interval5":
        return SAMCallback(variant="sam", rho=rho, interval=SAM_INTERVAL)
    if method == "looksam":  # a SAM step every k=5 steps (LookSAM's default)
        return SAMCallback(variant="looksam", rho=rho, alpha=args.looksam_alpha)
    # sam, asam, fsam, xsam (alpha searched on the first batch of each epoch: the callback's default)
    return SAMCallback(variant=method, rho=rho)


def train_one(method: str, rho: float | None, seed: int, data: DigitsData, args: argparse.Namespace) -> RunResult:
    """One run: ``seed`` fixes the initialization and the batch order (the same for every method)."""
    L.seed_everything(seed, verbose=False)
    eval_sets = {
        "train": (data.x_train, data.y_train),  # against the noisy labels it is trained on
        "val": (data.x_val, data.y_val),
        "test": (data.x_test, data.y_test),
    }
    model = DigitsMLP(hidden=args.hidden, lr=args.lr, weight_decay=args.weight_decay, eval_sets=eval_sets)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size, shuffle=True, generator=generator
    )
    sam = sam_callback(method, rho, args)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[sam] if sam is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    result = RunResult(method, method_label(method, rho, args), rho=rho, seed=seed)
    start = time.perf_counter()
    trainer.fit(model, train_loader)
    result.seconds = time.perf_counter() - start
    result.test_acc = list(model.eval_history["test"])
    result.val_acc = list(model.eval_history.get("val", []))
    result.train_acc = list(model.eval_history["train"])

    model.eval()
    with torch.no_grad():
        predictions = model(data.x_train).argmax(dim=1)
    result.train_acc_noisy = float((predictions == data.y_train).float().mean())
    if data.flipped.any():
        result.memorized = float((predictions[data.flipped] == data.y_train[data.flipped]).float().mean())
    return result


@functools.lru_cache(maxsize=8)
def cached_digits(noise: float, seed: int, val_fraction: float, split_seed: int) -> DigitsData:
    return make_digits(noise, seed, val_fraction=val_fraction, split_seed=split_seed)


def run_task(method: str, rho: float | None, seed: int, args: argparse.Namespace) -> RunResult:
    """One run of the demo's experiment (in a worker process or in this one)."""
    data = cached_digits(args.noise, seed, args.val_fraction, args.split_seed)
    with quiet_lightning():
        return train_one(method, rho, seed, data, args)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up chatter and warnings that do not apply to in-memory tensors; restore on exit."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        logger.setLevel(logging.WARNING)  # no "GPU available: False", no logger tips
        try:
            yield
        finally:
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- the experiment
def sweep_grid(method: str, args: argparse.Namespace) -> tuple[float, ...]:
    """The radii swept for ``method``: none for SGD (or with --no-sweep), ``--grid`` scaled for ASAM."""
    if method == "sgd" or args.no_sweep:
        return ()
    scale = args.asam_scale if method == "asam" else 1.0
    return tuple(round(r * scale, 10) for r in args.grid)


def choose_rho(val_acc: dict[float, float]) -> float:
    """The radius with the highest validation accuracy; on a tie the smaller radius. Sees no test number."""
    if not val_acc:
        raise ValueError("choose_rho: no validation scores")
    return max(sorted(val_acc), key=lambda rho: val_acc[rho])


Task = tuple[str, float | None, int, str]  # method, rho, seed, role: "sweep" or "final"


@dataclass
class MethodRuns:
    """Everything run for one method: the sweep on the first seed and the final runs at the chosen radius."""

    method: str
    grid: tuple[float, ...]
    sweep: dict[float, RunResult] = field(default_factory=dict)  # rho -> the first seed's run
    rho: float | None = None  # chosen on validation (or fixed, without a sweep)
    finals: list[RunResult] = field(default_factory=list)  # one per seed, at ``rho``

    @property
    def val_scores(self) -> dict[float, float]:
        return {rho: run.val_final for rho, run in self.sweep.items()}

    @property
    def sweep_seconds(self) -> float:
        """Training time of the sweep's runs other than the one reused as the first seed's final run."""
        return sum(run.seconds for rho, run in self.sweep.items() if rho != self.rho)

    def start(self, args: argparse.Namespace) -> list[Task]:
        """The first runs: the sweep on the first seed, or (nothing to sweep) the final runs at the fixed radius."""
        if self.grid:
            return [(self.method, rho, args.seeds[0], "sweep") for rho in self.grid]
        self.rho = default_rho(self.method, args)
        return self.final_tasks(args.seeds)

    def final_tasks(self, seeds: Sequence[int]) -> list[Task]:
        return [(self.method, self.rho, seed, "final") for seed in seeds]

    def add(self, run: RunResult, role: str, args: argparse.Namespace) -> list[Task]:
        """Record a finished run; when it completes the sweep, choose rho and return the other seeds' runs."""
        if role == "final":
            self.finals.append(run)
            return []
        self.sweep[run.rho] = run
        if len(self.sweep) < len(self.grid):
            return []
        self.rho = choose_rho(self.val_scores)
        self.finals.append(self.sweep[self.rho])  # the first seed's final run
        return self.final_tasks(args.seeds[1:])


class SerialExecutor(cf.Executor):
    """Runs each task at submission, in this process: ``--jobs 1``, or where forking is not available."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller through the future
            future.set_exception(error)
        return future


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def make_executor(args: argparse.Namespace) -> cf.Executor:
    """``--jobs`` forked workers with ``--threads`` torch threads each; serial for one job or without fork."""
    if args.jobs > 1 and sys.platform == "linux":
        context = multiprocessing.get_context("fork")  # the workers inherit this module, loaded however it was
        return cf.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=set_threads, initargs=(args.threads,))
    return SerialExecutor()


def run_experiment(
    args: argparse.Namespace, report: Callable[[RunResult, str], None] = lambda run, role: None
) -> dict[str, MethodRuns]:
    """Sweep each method's grid on the first seed, choose rho on validation, then run the other seeds.

    A method's final runs are submitted as soon as its own sweep is complete, so the workers stay busy.
    """
    runs = {m: MethodRuns(m, sweep_grid(m, args)) for m in args.methods}
    with make_executor(args) as pool:
        pending: dict[cf.Future, Task] = {}

        def submit(tasks: list[Task]) -> None:
            for task in tasks:
                method, rho, seed, _ = task
                pending[pool.submit(run_task, method, rho, seed, args)] = task

        for method_runs in sorted(runs.values(), key=lambda r: -RELATIVE_COST.get(r.method, 1.0)):
            submit(method_runs.start(args))  # the expensive methods first
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                method, _, _, role = pending.pop(future)
                run = future.result()
                report(run, role)
                submit(runs[method].add(run, role, args))
    for method_runs in runs.values():
        method_runs.finals.sort(key=lambda run: args.seeds.index(run.seed))
    return runs


# ---------------------------------------------------------------------------------------------- report
def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def result_rows(runs: dict[str, MethodRuns], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The JSON table: one row per method."""
    rows = []
    for m in runs.values():
        test = [run.final for run in m.finals]
        rows.append(
            {
                "method": m.method,
                "label": m.finals[0].label,
                "rho": m.rho,
                "final_test_acc": mean(test),
                "final_test_acc_std": None if len(test) < 2 else std(test),
                "test_acc_per_seed": test,
                "seeds": [run.seed for run in m.finals],
                "val_acc": m.finals[0].val_final if m.finals[0].val_acc else None,  # first seed, noisy labels
                "early_stop_test_acc": mean([run.early_stop for run in m.finals]) if m.finals[0].val_acc else None,
                "early_stop_epochs": [run.early_stop_epoch for run in m.finals] if m.finals[0].val_acc else None,
                "grid": list(m.grid),
                "val_acc_per_rho": [{"rho": rho, "val_acc": acc} for rho, acc in sorted(m.val_scores.items())],
                "rho_at_grid_edge": bool(m.grid) and m.rho in (min(m.grid), max(m.grid)),
                "train_acc_noisy": mean([run.train_acc_noisy for run in m.finals]),
                "memorized": mean([run.memorized for run in m.finals]),
                "seconds": sum(run.seconds for run in m.finals),
                "sweep_seconds": m.sweep_seconds,
                "epochs": args.epochs,
                "noise": args.noise,
                "val_fraction": args.val_fraction,
            }
        )
    return rows


def print_sweep(runs: dict[str, MethodRuns], console: Console) -> None:
    swept = [m for m in runs.values() if m.grid]
    if not swept:
        return
    table = Table(title=f"validation accuracy (noisy labels, seed {swept[0].finals[0].seed}) per rho; * = chosen")
    table.add_column("method", no_wrap=True)
    for i in range(max(len(m.grid) for m in swept)):
        table.add_column(f"rho #{i + 1}", justify="right", no_wrap=True)
    for m in swept:
        cells = [f"{rho:g}: {acc:.3f}{'*' if rho == m.rho else ' '}" for rho, acc in sorted(m.val_scores.items())]
        table.add_row(m.method, *cells)
    console.print(table)


def print_results(rows: list[dict[str, Any]], data: DigitsData, args: argparse.Namespace, console: Console) -> None:
    title = (
        f"digits, {data.noise_rate:.0%} of {len(data.y_train)} training labels flipped, {len(data.y_val)} noisy "
        f"validation and {len(data.y_test)} clean test images, {args.epochs} epochs, seeds {args.seeds}"
    )
    table = Table(title=title)
    for name in ("method", "rho"):
        table.add_column(name, no_wrap=True)
    columns = ("clean test acc", "per seed", "stopped early", "train acc, noisy", "flips memorized", "final runs")
    for name in (*columns, "sweep"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        acc = f"{row['final_test_acc']:.3f}"
        if row["final_test_acc_std"] is not None:
            acc += f" ± {row['final_test_acc_std']:.3f}"
        early = row["early_stop_test_acc"]
        table.add_row(
            row["method"],
            "-" if row["rho"] is None else f"{row['rho']:g}" + (" (edge)" if row["rho_at_grid_edge"] else ""),
            acc,
            " ".join(f"{a:.3f}" for a in row["test_acc_per_seed"]),
            "-" if early is None else f"{early:.3f}",
            f"{row['train_acc_noisy']:.3f}",
            f"{row['memorized']:.3f}",
            f"{row['seconds']:.1f} s",
            f"{row['sweep_seconds']:.1f} s",
        )
    console.print(table)
    how = "fixed (--no-sweep)" if args.no_sweep else "chosen by the final-epoch accuracy on the noisy validation split"
    console.print(
        f"[dim]rho {how}{'' if args.no_sweep else ' (first seed)'}; clean test accuracy after the last epoch, "
        "mean ± std over the seeds; stopped early = the same runs' clean test accuracy "
        "at their epoch of best validation accuracy (mean); memorized = share of flipped training samples the final "
        "model predicts as their wrong label; times are Trainer.fit, summed over runs.[/dim]"
    )


def plot(runs: dict[str, MethodRuns], data: DigitsData, args: argparse.Namespace, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_val, ax_test, ax_train) = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    for i, m in enumerate(runs.values()):
        color, label = f"C{i}", m.finals[0].label
        if m.grid:
            scale = args.asam_scale if m.method == "asam" else 1.0
            rhos = sorted(m.sweep)
            name = m.method + (f" (ρ / {scale:g})" if scale != 1 else "")
            ax_val.plot([r / scale for r in rhos], [m.sweep[r].val_final for r in rhos], "o-", color=color, label=name)
            ax_val.plot([m.rho / scale], [m.sweep[m.rho].val_final], "*", markersize=14, color=color)
        elif m.finals[0].val_acc:
            ax_val.axhline(m.finals[0].val_final, color=color, linestyle="--", linewidth=1, label=f"{m.method} (no ρ)")
        epochs = np.arange(1, args.epochs + 1)
        test = np.mean([run.test_acc for run in m.finals], axis=0)
        train = np.mean([run.train_acc for run in m.finals], axis=0)
        marker = "o" if args.epochs <= 10 else None
        ax_test.plot(epochs, test, marker=marker, color=color, label=f"{label}: {test[-1]:.3f}")
        ax_train.plot(epochs, train, marker=marker, color=color, label=label)
    ax_val.set_xscale("log")
    ax_val.set_xlabel("rho")
    ax_val.set_title(f"sweep: validation accuracy, noisy labels (seed {args.seeds[0]})")
    ax_test.set_title(f"test accuracy (clean labels), mean over seeds {args.seeds}")
    ax_train.set_title("training accuracy against the noisy labels")
    ax_train.axhline(1 - data.noise_rate, color="grey", linestyle="--", linewidth=1)
    ax_train.annotate(
        "fits the clean part only", (1, 1 - data.noise_rate), xytext=(0, 4), textcoords="offset points", color="grey"
    )
    for ax in (ax_test, ax_train):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_val, ax_test, ax_train):
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    ax_train.set_ylim(top=1.03)
    fig.suptitle(
        f"digits: {data.noise_rate:.0%} of training labels flipped, {args.epochs} epochs; rho chosen per method on a "
        "noisy validation split (*)"
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    parser.add_argument("--noise", type=float, default=0.35, help="fraction of training labels flipped (0.35)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS), help="default: %(default)s"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="final runs (default 0 1 2)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/test split (0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the training set")
    parser.add_argument(
        "--grid", type=float, nargs="+", default=list(DEFAULT_GRID), help="radii swept (default %(default)s)"
    )
    parser.add_argument("--asam-scale", type=float, default=10.0, help="ASAM's grid is this times --grid (10)")
    parser.add_argument("--no-sweep", action="store_true", help="no sweep: --rho, --asam-rho, --xsam-rho as given")
    parser.add_argument("--rho", type=float, default=0.05, help="with --no-sweep: SAM's (and the others') radius")
    parser.add_argument("--asam-rho", type=float, default=0.5, help="with --no-sweep: ASAM's radius (0.5)")
    parser.add_argument("--xsam-rho", type=float, default=0.15, help="with --no-sweep: XSAM's radius (0.15)")
    parser.add_argument("--looksam-alpha", type=float, default=0.7, help="LookSAM: weight of the reused g_v (0.7)")
    parser.add_argument("--ssam-sparsity", type=float, default=0.5, help="SSAM: share of coordinates NOT perturbed")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine-annealed (0.05)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (5e-4)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width (256)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fastest here)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no line per finished run")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, the grid's ends, 2 seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.grid, args.seeds = 2, sorted({min(args.grid), max(args.grid)}), args.seeds[:2]
    if not 0.0 <= args.noise < 1.0:
        parser.error("--noise must be in [0, 1)")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val-fraction must be in [0, 1)")
    if not args.no_sweep and args.val_fraction == 0:
        parser.error("the sweep needs a validation split: --val-fraction > 0, or --no-sweep")
    if args.epochs < 1 or args.jobs < 1 or args.threads < 1:
        parser.error("--epochs, --jobs and --threads must be >= 1")
    if not all(r > 0 and math.isfinite(r) for r in [*args.grid, args.asam_scale]):
        parser.error("--grid and --asam-scale must be finite and > 0")
    if not 0.0 <= args.ssam_sparsity < 1.0:
        parser.error("--ssam-sparsity must be in [0, 1)")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    return args


def train_method(
    method: str, *, noise: float = 0.35, seed: int = 0, epochs: int | None = None, **options: Any
) -> RunResult:
    """Train one run at a fixed radius, quietly (no table, no plot), and return its :class:`RunResult`.

    Unlike the demo's main run, the train/test split is seeded by ``seed`` and there is no validation split
    (the whole training split is trained on), unless ``options`` say otherwise. ``options`` override the
    command-line defaults by their attribute names (``rho=0.2``, ``asam_rho=1.0``, ``lr``, ``hidden``,
    ``val_fraction``, ``split_seed``, ...). The caller sets ``torch.set_num_threads``. Example::

        result = train_method("looksam", noise=0.2, seed=1, epochs=40)
        result.final, result.best, result.test_acc
    """
    check_method(method)
    args = parse_args(["--noise", str(noise), "--no-sweep", "--val-fraction", "0", "--split-seed", str(seed)])
    if epochs is not None:
        args.epochs = epochs
    for name, value in options.items():
        if not hasattr(args, name):
            raise TypeError(f"train_method: unknown option {name!r}")
        setattr(args, name, value)
    data = make_digits(args.noise, seed, val_fraction=args.val_fraction, split_seed=args.split_seed)
    with quiet_lightning():
        return train_one(method, default_rho(method, args), seed, data, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the rows, the runs per method, the paths of the JSON and the plot."""
    args = parse_args(argv)
    set_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the tables, not Rich's 80 columns
        console.width = max(console.width, 140)
    data = cached_digits(args.noise, args.seeds[0], args.val_fraction, args.split_seed)
    n_runs = sum(max(len(sweep_grid(m, args)) - 1, 0) + len(args.seeds) for m in args.methods)
    console.print(
        f"digits: {len(data.y_train)} train ({int(data.flipped.sum())} labels flipped), {len(data.y_val)} noisy "
        f"validation, {len(data.y_test)} clean test; {', '.join(args.methods)}; {args.epochs} epochs; "
        f"{'no sweep' if args.no_sweep else f'rho grid {args.grid} (ASAM x{args.asam_scale:g})'}; seeds "
        f"{args.seeds}: {n_runs} runs on {args.jobs} process(es)"
    )
    started = time.perf_counter()

    def report(run: RunResult, role: str) -> None:
        if not args.no_progress:
            val = f"val {run.val_final:.3f}" if run.val_acc else ""
            console.print(
                f"[dim]{time.perf_counter() - started:5.1f} s  {role:5}  seed {run.seed}  {run.label:24} {val}  "
                f"{run.seconds:.1f} s[/dim]",
                highlight=False,
            )

    runs = run_experiment(args, report)
    elapsed = time.perf_counter() - started
    rows = result_rows(runs, args)
    print_sweep(runs, console)
    print_results(rows, data, args, console)
    json_path = args.out.with_suffix(".json")
    plot(runs, data, args, args.out)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"{n_runs} runs in {elapsed:.1f} s; plot written to {args.out}, table to {json_path}")
    return {
        "rows": rows,
        "runs": runs,
        "chosen": {m: r.rho for m, r in runs.items()},
        "results": {m: r.finals for m, r in runs.items()},
        "plot": args.out,
        "json": json_path,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
