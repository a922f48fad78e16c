"""SAM with sharded parameters: Lightning's ModelParallelStrategy, FSDP2 (``fully_shard``) or tensor parallel.

An MLP on scikit-learn's bundled 8x8 digits (no download) trained on 2 CPU processes (gloo) with
``SAMCallback`` and an unchanged ``LightningModule``: its ``configure_model`` shards the network, and SAM perturbs
each rank's shard in place, with the gradient norm reduced over all shards. Prints the test accuracy and the
parameters and SAM state each rank holds.

Run::

    python examples/sharded_sam.py                          # FSDP2 over 2 ranks, F-SAM
    python examples/sharded_sam.py --layout tp              # tensor parallel over 2 ranks
    python examples/sharded_sam.py --variant sam --rho 0.1 --precision bf16-mixed
    python examples/sharded_sam.py --quick                  # 1 epoch, a smoke test

See docs/strategies.md ("Sharded training") for what is global, what is per shard, and the limits.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAMCallback
from lightning_sam.distributed import gather_objects


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["fsdp", "tp"], default="fsdp", help="FSDP2 or tensor parallel")
    parser.add_argument("--variant", default="fsam", help="sam, asam, fsam, looksam or xsam")
    parser.add_argument("--rho", type=float, default=None, help="the variant's default when omitted")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    return parser.parse_args(argv)


def digits() -> tuple[TensorDataset, TensorDataset]:
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)

    def dataset(x: Any, y: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(scaler.transform(x), dtype=torch.float32), torch.tensor(y))

    return dataset(x_train, y_train), dataset(x_test, y_test)


class DigitsMLP(L.LightningModule):
    """A plain LightningModule: only ``configure_model`` knows about sharding."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10)
        )

    def configure_model(self) -> None:
        if self.layout == "tp":  # column-wise then row-wise: the 256 hidden units are split over the ranks
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)  # the module training_step calls (not the LightningModule itself)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def local_megabytes(tensors: list[Tensor]) -> float:
    """Bytes this rank holds of ``tensors`` (a DTensor's local shard), in MiB."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    train, test = digits()
    data_parallel, tensor_parallel = (2, 1) if args.layout == "fsdp" else (1, 2)
    sam = SAMCallback(args.variant, rho=args.rho)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel),
        precision=args.precision,
        max_epochs=1 if args.quick else args.epochs,
        callbacks=[sam],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = DigitsMLP(args.layout)
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True))

    engine = sam.driver.engine
    saved = local_megabytes(engine._saved_views or [])
    state = engine.variant.state_dict()
    variant_state = local_megabytes([t for t in state.get("ema", state.get("g_v", {})).values()])
    with torch.no_grad():
        x, y = test.tensors
        correct = (module.net(x).argmax(dim=1) == y).float().mean()  # both ranks see the whole test set
    result = {
        "rank": trainer.global_rank,
        "test_accuracy": float(correct),
        "parameters_MiB": local_megabytes(list(module.parameters())),
        "saved_copy_MiB": saved,
        "variant_state_MiB": variant_state,
    }
    for rank_result in gather_objects(result):  # a collective: every rank calls it
        if trainer.global_rank == 0:
            print(
                f"rank {rank_result['rank']}: test accuracy {rank_result['test_accuracy']:.3f}, parameters "
                f"{rank_result['parameters_MiB']:.3f} MiB, SAM saved copy {rank_result['saved_copy_MiB']:.3f} MiB, "
                f"{args.variant} state {rank_result['variant_state_MiB']:.3f} MiB"
            )
    return result


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # an orderly gloo teardown: exiting with it alive can abort (SIGABRT)
        torch.distributed.destroy_process_group()
