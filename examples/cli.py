"""SAMCallback configured from YAML with LightningCLI.

    python examples/cli.py fit --config examples/sam_cli.yaml
    python examples/cli.py fit --config examples/sam_cli.yaml \\
        --trainer.callbacks.init_args.variant.init_args.sparsity 0.9

The variant is a ``class_path`` (``lightning_sam.variants.SSAM``, ...) with its options as ``init_args``, or a plain
name (``variant: asam``) with the variant's defaults.
The model and data are small and synthetic so the example runs in seconds on a CPU.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(L.LightningModule):
    """An MLP on 16 features, 4 classes."""

    def __init__(self, hidden: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class SyntheticData(L.LightningDataModule):
    """A fixed random classification problem (a random linear teacher)."""

    def __init__(self, samples: int = 512, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, 16, generator=generator)
        teacher = torch.randn(16, 4, generator=generator)
        self.dataset = TensorDataset(x, (x @ teacher).argmax(1))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(TinyClassifier, SyntheticData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
