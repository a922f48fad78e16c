"""Plain SGD (no SAM) under Lightning's ModelParallelStrategy (FSDP2 via ``fully_shard``) on 2 CPU processes (gloo).

Run by tests/test_model_parallel.py as ``python model_parallel_script.py <mode> <out_dir>``:

* ``straight``: 3 epochs, a ModelCheckpoint at the end of every epoch; rank 0 writes the full weights;
* ``resume``: fresh objects, resumed from the epoch-1 checkpoint to 3 epochs; rank 0 writes the full weights.

The groundwork of sharded SAM (issue "Sharded training"): it pins that Lightning's own resume under this strategy is
exact on CPU, so a later difference in a variant's resume is the variant's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from script_exit import finish
from torch import nn
from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)


class Sharded(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def main(mode: str, out: Path) -> None:
    checkpoints = out / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1)] if mode == "straight" else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=mode == "straight",
        callbacks=callbacks,
        default_root_dir=out / mode,
    )
    module = Sharded()
    ckpt_path = str(next(checkpoints.glob("epoch=0-*"))) if mode == "resume" else None
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    weights = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in module.named_parameters()
    }
    if trainer.global_rank == 0:
        torch.save({"weights": weights, "global_step": trainer.global_step}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    finish()  # destroy the process group, exit without finalization (see script_exit)
