"""Shared workloads of the bench/ scripts (a helper module, not a benchmark): models, synthetic batches, the
optimizer, the LightningModule and the Trainer every timing script uses.

Models (``MODELS``), all on synthetic tensors, 10 classes, cross-entropy, SGD (lr 0.01, momentum 0.9):

=========  ==========================================================================================
cnn        3 x (conv3x3 without bias + BatchNorm + ReLU), 16/32/64 channels, two max-pools, global pool,
           linear; 3x32x32 inputs, batch 64 (24k parameters in 11 tensors)
mlp        10 Linear layers of width 256 with ReLU, batch 128 (594k parameters in 20 tensors)
mlp48      48 x (Linear 128 + LayerNorm + GELU) + Linear 128 -> 10, batch 128: transformer-shaped, many small
           tensors (800k parameters in 194 tensors)
=========  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from lightning_sam import SAMEngine
from lightning_sam.batches import batchnorm_in_eval

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


def build_mlp_ln(depth: int = 48, width: int = 128) -> nn.Module:
    """``depth`` x (Linear + LayerNorm + GELU) and a linear head: 4 * depth + 2 parameter tensors."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS = {
    "cnn": ModelSpec(
        "cnn", build_cnn, (3, 32, 32), 64, description="3x(conv3x3+BN+ReLU) 16/32/64 ch + linear, 3x32x32, batch 64"
    ),
    "mlp": ModelSpec("mlp", build_mlp, (256,), 128, description="10 Linear layers, width 256, ReLU, batch 128"),
    "mlp48": ModelSpec(
        "mlp48", build_mlp_ln, (128,), 128, description="48 x (Linear 128 + LayerNorm + GELU) + linear, batch 128"
    ),
}


def make_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device)


def make_batches(spec: ModelSpec, device: torch.device, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` distinct synthetic batches (seeded: the same for every method)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(spec.batch, *spec.input_shape, generator=generator)
        y = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
        out.append((x.to(device), y.to(device)))
    return out


def make_batch(spec: ModelSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    return make_batches(spec, device, 1)[0]


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def param_megabytes(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def param_count(spec: ModelSpec) -> int:
    return sum(p.numel() for p in spec.build().parameters())


def tensor_count(spec: ModelSpec) -> int:
    return sum(1 for _ in spec.build().parameters())


# ---------------------------------------------------------------------------------------------------- SSAM


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


# ---------------------------------------------------------------------------------------------------- Lightning


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


class SameBatch(Batches):
    """``n`` copies of one pre-built batch."""

    def __init__(self, batch: tuple[Tensor, Tensor], n: int) -> None:
        super().__init__([batch] * n)


def make_trainer(
    device: torch.device, steps: int, callbacks: list[Callback], max_epochs: int = 1, **options: Any
) -> L.Trainer:
    """A Trainer with nothing but the loop: no logger, checkpointing, progress bar, summary or sanity check.

    ``steps``: ``max_steps`` (-1: run ``max_epochs`` whole epochs). ``options``: more Trainer arguments.
    """
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
        max_epochs=max_epochs,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **options,
    )
