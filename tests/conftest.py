"""Shared fixtures: small models, fixed batches, a quiet Trainer factory."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(1)


def make_data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(x, y)


def fixed_loader(n: int = 64, batch_size: int = 16, **kwargs: Any) -> DataLoader:
    return DataLoader(make_data(n, **kwargs), batch_size=batch_size, shuffle=False)


def make_mlp(
    features: int = 8, hidden: int = 16, classes: int = 3, batchnorm: bool = False, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    """A plain LightningModule: training_step returns a loss tensor (or a dict, or logs and updates metrics)."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: str = "sgd",
        lr: float = 0.1,
        return_dict: bool = False,
        with_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.return_dict = return_dict
        self.with_metrics = with_metrics
        if with_metrics:
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
            self.metrics = torchmetrics.MetricCollection(
                {
                    "prec": torchmetrics.Precision(task="multiclass", num_classes=3),
                    "rec": torchmetrics.Recall(task="multiclass", num_classes=3),
                },
                compute_groups=True,
            )
        self.logged_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if self.with_metrics:
            self.train_acc(logits, y)
            self.metrics.update(logits, y)
            self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return {"loss": loss} if self.return_dict else loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


def make_optimizer(name: str, params: Any, lr: float = 0.1) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr * 0.1, weight_decay=0.01)
    if name == "adam_fused":
        return torch.optim.Adam(params, lr=lr * 0.1, fused=True)
    raise ValueError(name)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": False,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def training_closure(net: nn.Module, optimizer: torch.optim.Optimizer, batch: Any):
    """A closure for ``SAMEngine.step``: zero the gradients, cross-entropy of ``net`` on ``batch``, backward."""
    x, y = batch

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def cross_entropy_of(batch: Any):
    x, y = batch
    return lambda model: F.cross_entropy(model(x), y)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
