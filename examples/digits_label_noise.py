"""SGD vs SGD + SAM on scikit-learn's digits with noisy training labels.

A quick, self-contained first look at ``lightning_sam``: no downloads, about 30 seconds on 2 CPU cores.

* Data: the 1,797 8x8 digit images bundled with scikit-learn, split into train/test with a fixed seed. A fraction
  of the *training* labels (default 35%) is flipped to a random other class; the test labels stay clean.
* Model: a small MLP as an ordinary LightningModule (automatic optimization, SGD with momentum, cosine schedule).
* Runs: the same model, seeds, data order and epochs, trained with plain SGD, then with
  ``SAMCallback(variant="sam")`` (and, unless ``--methods`` says otherwise, ``SAMCallback(variant="asam")``).
  ``--methods`` also offers ``ssam`` (``SAMCallback("ssam", rho=--rho, sparsity=--ssam-sparsity)``: sparse SAM with
  its default Fisher mask, refreshed every epoch) and ``fsam`` (``SAMCallback("fsam", rho=--rho)``: Friendly SAM),
  and the cheaper or newer ones: ``sam_interval5`` (``SAMCallback("sam", rho=--rho, interval=5)``: a SAM step every
  5th step, plain SGD steps in between), ``looksam`` (``SAMCallback("looksam", rho=--rho, alpha=--looksam-alpha)``,
  k=5) and
  ``xsam`` (``SAMCallback("xsam", rho=--xsam-rho)``: explicit SAM, its alpha searched on each epoch's first batch).
  The only difference between the runs is the callback in the Trainer.

Prints a table of final and best test accuracy per method and writes a plot of test accuracy (and of training
accuracy against the noisy labels) per epoch to ``examples/out/digits_label_noise.png``.
"Best" is the maximum over epochs *on the test set*: an optimistic, oracle early-stopping number, shown only to
make the memorization of noisy labels visible. The honest number is "final".

The defaults are standard settings, not tuned for SAM (rho=0.05 is SAM's usual default, 0.5 ASAM's). ``rho`` is an
absolute radius in weight space, so what counts as a large neighbourhood depends on the model and its weight
norm; try ``--rho`` to see how the radius changes the outcome.

Run::

    python examples/digits_label_noise.py                  # defaults: 35% noise, 60 epochs, SAM rho=0.05
    python examples/digits_label_noise.py --quick          # 2 epochs, a smoke test
    python examples/digits_label_noise.py --noise 0.4 --rho 0.1 --seed 1
    python examples/digits_label_noise.py --methods sgd sam asam ssam fsam   # about twice as long
    python examples/digits_label_noise.py --methods sgd sam sam_interval5 looksam xsam

``train_method(method, noise=..., seed=..., epochs=..., **options)`` trains one run without printing anything and
returns its ``RunResult`` (per-epoch test accuracy, ``.final``, ``.best``); ``bench/generalization.py`` uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.callbacks import RichProgressBar
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
DEFAULT_METHODS = ("sgd", "sam", "asam")  # the quick default; the others via --methods
SAM_INTERVAL = 5  # sam_interval5: SAM on every 5th optimizer step


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor  # noisy labels, what the model is trained on
    y_train_clean: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean
    flipped: torch.Tensor  # bool mask over the training set

    @property
    def noise_rate(self) -> float:
        return float(self.flipped.float().mean())


def make_digits(noise: float, seed: int, test_size: float = 0.3) -> DigitsData:
    """Digits split train/test (stratified, seeded); ``noise`` of the training labels flipped to another class."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)  # statistics from the training images only
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    rng = np.random.default_rng(seed)
    n_flip = round(noise * len(y_train))
    flip = rng.choice(len(y_train), size=n_flip, replace=False)
    y_noisy = y_train.copy()
    # A random *other* class: shift by 1..9 (mod 10), uniform over the nine wrong labels.
    y_noisy[flip] = (y_train[flip] + rng.integers(1, NUM_CLASSES, size=n_flip)) % NUM_CLASSES

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return DigitsData(
        x_train=as_x(x_train),
        y_train=as_y(y_noisy),
        y_train_clean=as_y(y_train),
        x_test=as_x(x_test),
        y_test=as_y(y_test),
        flipped=torch.as_tensor(y_noisy != y_train),
    )


# ---------------------------------------------------------------------------------------------- model
class DigitsMLP(L.LightningModule):
    """A plain LightningModule: nothing in it knows about SAM."""

    def __init__(self, hidden: int = 256, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.test_acc_history: list[float] = []
        self.train_acc_history: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits, y)  # against the noisy labels the model is trained on
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        acc = self.train_acc.compute()
        self.train_acc.reset()
        self.log("train_acc_noisy", acc)
        self.train_acc_history.append(float(acc))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        acc = self.test_acc.compute()
        self.test_acc.reset()
        self.log("test_acc", acc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.test_acc_history.append(float(acc))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# ---------------------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    label: str
    test_acc: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)  # per epoch, against the noisy labels
    train_acc_noisy: float = float("nan")  # final-epoch accuracy against the noisy training labels
    memorized: float = float("nan")  # fraction of flipped training samples predicted as their *wrong* label
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.test_acc[-1]

    @property
    def best(self) -> float:
        return max(self.test_acc)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.test_acc)) + 1


def method_label(method: str, args: argparse.Namespace) -> str:
    if method == "sgd":
        return "SGD"
    if method == "sam":
        return f"SGD+SAM ρ={args.rho}"
    if method == "asam":
        return f"SGD+ASAM ρ={args.asam_rho}"
    if method == "ssam":
        return f"SGD+SSAM ρ={args.rho} s={args.ssam_sparsity}"
    if method == "fsam":
        return f"SGD+F-SAM ρ={args.rho}"
    if method == "sam_interval5":
        return f"SGD+SAM ρ={args.rho} every {SAM_INTERVAL}th step"
    if method == "looksam":
        return f"SGD+LookSAM ρ={args.rho} k=5 α={args.looksam_alpha}"
    if method == "xsam":
        return f"SGD+XSAM ρ={args.xsam_rho}"
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def sam_callback(method: str, args: argparse.Namespace) -> SAMCallback | None:
    """The only thing that differs between the runs: the callback (None for plain SGD)."""
    if method == "sam":
        return SAMCallback(variant="sam", rho=args.rho)
    if method == "asam":
        return SAMCallback(variant="asam", rho=args.asam_rho)
    if method == "ssam":  # Fisher mask (default) from 128 training samples, refreshed every epoch
        return SAMCallback(variant="ssam", rho=args.rho, sparsity=args.ssam_sparsity)
    if method == "fsam":
        return SAMCallback(variant="fsam", rho=args.rho)
    if method == "sam_interval5":
        return SAMCallback(variant="sam", rho=args.rho, interval=SAM_INTERVAL)
    if method == "looksam":  # a SAM step every k=5 steps (LookSAM's default)
        return SAMCallback(variant="looksam", rho=args.rho, alpha=args.looksam_alpha)
    if method == "xsam":  # alpha searched on the first batch of each epoch (the callback's default)
        return SAMCallback(variant="xsam", rho=args.xsam_rho)
    if method != "sgd":
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    return None


def train_one(method: str, data: DigitsData, args: argparse.Namespace, show_progress: bool) -> RunResult:
    L.seed_everything(args.seed, verbose=False)  # same init and same batch order for every method
    model = DigitsMLP(hidden=args.hidden, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size, shuffle=True, generator=generator
    )
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=512)

    callbacks: list[L.Callback] = []
    sam = sam_callback(method, args)
    if sam is not None:
        callbacks.append(sam)
    if show_progress:
        callbacks.append(RichProgressBar())

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show_progress,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    result = RunResult(method, method_label(method, args))
    start = time.perf_counter()
    trainer.fit(model, train_loader, test_loader)
    result.seconds = time.perf_counter() - start
    result.test_acc = list(model.test_acc_history)
    result.train_acc = list(model.train_acc_history)

    model.eval()
    with torch.no_grad():
        predictions = model(data.x_train).argmax(dim=1)
    result.train_acc_noisy = float((predictions == data.y_train).float().mean())
    if data.flipped.any():
        result.memorized = float((predictions[data.flipped] == data.y_train[data.flipped]).float().mean())
    return result


# ---------------------------------------------------------------------------------------------- report
def print_table(results: list[RunResult], data: DigitsData, args: argparse.Namespace, console: Console) -> None:
    title = (
        f"digits, {data.noise_rate:.0%} of {len(data.y_train)} training labels flipped, "
        f"{len(data.y_test)} clean test images, {args.epochs} epochs, seed {args.seed}"
    )
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    table.add_column("final test acc", justify="right")
    table.add_column("best test acc (epoch)", justify="right")
    table.add_column("train acc, noisy labels", justify="right")
    table.add_column("flips memorized", justify="right")
    table.add_column("time", justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            r.label,
            f"{r.final:.4f}",
            f"{r.best:.4f} ({r.best_epoch})",
            f"{r.train_acc_noisy:.4f}",
            f"{r.memorized:.4f}",
            f"{r.seconds:.1f} s",
        )
    console.print(table)
    console.print(
        "[dim]best = max over epochs of the test accuracy (an oracle, optimistic); memorized = share of flipped "
        "training samples the final model predicts as their wrong label.[/dim]"
    )


def plot(results: list[RunResult], data: DigitsData, args: argparse.Namespace, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_test, ax_train) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for r in results:
        epochs = np.arange(1, len(r.test_acc) + 1)
        marker = "o" if len(epochs) <= 10 else None
        (line,) = ax_test.plot(epochs, r.test_acc, marker=marker, label=f"{r.label}: final {r.final:.3f}")
        ax_train.plot(epochs, r.train_acc, marker=marker, color=line.get_color(), label=r.label)
    ax_test.set_title("test accuracy (clean labels)")
    ax_train.set_title("training accuracy against the noisy labels")
    ax_train.axhline(1 - data.noise_rate, color="grey", linestyle="--", linewidth=1)
    ax_train.annotate(
        "fits the clean part only", (1, 1 - data.noise_rate), xytext=(0, 4), textcoords="offset points", color="grey"
    )
    for ax in (ax_test, ax_train):
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_train.set_ylim(top=1.03)
    ax_test.legend(loc="best")
    ax_train.legend(loc="lower right")
    fig.suptitle(f"digits: {data.noise_rate:.0%} of training labels flipped, {args.epochs} epochs, seed {args.seed}")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60, help="epochs per run (default 60)")
    parser.add_argument("--noise", type=float, default=0.35, help="fraction of training labels flipped (0.35)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM (and SSAM, F-SAM) radius (default 0.05)")
    parser.add_argument("--asam-rho", type=float, default=0.5, help="ASAM neighbourhood radius (default 0.5)")
    parser.add_argument(
        "--looksam-alpha", type=float, default=0.7, help="LookSAM: weight of the reused g_v (default 0.7, LookSAM's)"
    )
    parser.add_argument("--xsam-rho", type=float, default=0.15, help="XSAM ascent radius (default 0.15, XSAM's)")
    parser.add_argument(
        "--ssam-sparsity", type=float, default=0.5, help="SSAM: fraction of coordinates NOT perturbed (0.5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the label noise and training")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(DEFAULT_METHODS),
        help=f"runs to compare (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine-annealed (0.05)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width (256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny MLP)")
    parser.add_argument("--no-progress", action="store_true", help="hide the Rich progress bar")
    parser.add_argument("--quick", action="store_true", help="a tiny run (2 epochs) to check that everything works")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    if not 0.0 <= args.noise < 1.0:
        parser.error("--noise must be in [0, 1)")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not 0.0 <= args.ssam_sparsity < 1.0:
        parser.error("--ssam-sparsity must be in [0, 1)")
    return args


def train_method(
    method: str, *, noise: float = 0.35, seed: int = 0, epochs: int | None = None, **options: Any
) -> RunResult:
    """Train one run quietly (no progress bar, no table, no plot) and return its :class:`RunResult`.

    ``options`` override the command-line defaults by their attribute names (``rho=0.2``, ``asam_rho=1.0``, ``lr``,
    ``hidden``, ...). The caller sets ``torch.set_num_threads``. Example::

        result = train_method("looksam", noise=0.2, seed=1, epochs=40)
        result.final, result.best, result.test_acc
    """
    args = parse_args(["--noise", str(noise), "--seed", str(seed), "--no-progress"])
    if epochs is not None:
        args.epochs = epochs
    for name, value in options.items():
        if not hasattr(args, name):
            raise TypeError(f"train_method: unknown option {name!r}")
        setattr(args, name, value)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    data = make_digits(args.noise, args.seed)
    with quiet_lightning():
        return train_one(method, data, args, show_progress=False)


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns ``{"results": {method: RunResult}, "plot": Path}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()

    data = make_digits(args.noise, args.seed)
    console.print(
        f"digits: {len(data.y_train)} train ({int(data.flipped.sum())} labels flipped), {len(data.y_test)} test; "
        f"methods: {', '.join(args.methods)}; {args.epochs} epochs"
    )
    results = []
    with quiet_lightning():
        for method in args.methods:
            console.rule(method_label(method, args))
            results.append(train_one(method, data, args, show_progress=not args.no_progress))

    print_table(results, data, args, console)
    plot(results, data, args, args.out)
    console.print(f"plot written to {args.out}")
    return {"results": {r.method: r for r in results}, "plot": args.out}


if __name__ == "__main__":
    main()
