"""SAM in a Lightning Fabric training loop, with ``SAMEngine`` (no Trainer, no callback).

A small MLP on scikit-learn's bundled 8x8 digits (no download), trained with SGD + SAM (or ASAM). Runs on CPU in under
a minute; ``--devices 2`` runs 2-process DDP (gloo) with each rank ascending with its own gradient, as
``SAMCallback`` does by default.

One step::

    def closure():                                  # zero, forward, backward, return the loss
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        fabric.backward(loss)
        return loss

    engine.step(closure, optimizer, no_sync=lambda: fabric.no_backward_sync(model))
    # pass 1 (local under DDP) -> ascend -> pass 2 at w + e (all-reduced) -> descend, exact restore -> optimizer.step()

Run::

    python examples/fabric_sam.py                              # 1 process, 32-true, SAM rho=0.05
    python examples/fabric_sam.py --precision bf16-mixed
    python examples/fabric_sam.py --devices 2                  # DDP, local pass 1 (m-sharpness)
    python examples/fabric_sam.py --devices 2 --sync-ascent    # DDP, pass 1 all-reduced too (global SAM)
    python examples/fabric_sam.py --variant asam --rho 0.5
    python examples/fabric_sam.py --quick                      # 1 epoch, a smoke test

See docs/fabric.md for what is tested and the limits.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAMEngine
from lightning_sam.distributed import all_reduce_sum_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: DDP with gloo)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--variant", default="sam", choices=["sam", "asam"])
    parser.add_argument("--rho", type=float, default=None, help="neighbourhood radius (default: the variant's)")
    parser.add_argument("--sync-ascent", action="store_true", help="DDP: all-reduce pass 1 too (global SAM)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    return parser.parse_args(argv)


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    def as_dataset(features: Any, labels: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))

    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate; returns ``{"steps", "test_acc", "sharpness", "seconds"}`` (on every rank)."""
    args = parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    fabric = Fabric(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision=args.precision,
    )
    fabric.launch()  # with --devices 2, starts the second process (it re-runs this script)
    fabric.seed_everything(args.seed)
    train_set, test_set = digits(args.seed)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    # model.module is the plain nn.Module: its parameter names key the variant's state (the same with and without DDP)
    engine = SAMEngine.from_optimizer(optimizer, model.module, args.variant, args.rho)
    engine.set_all_reduce(all_reduce_sum_)  # for variants whose state every rank must agree on (no-op for SAM/ASAM)
    train_loader, test_loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),  # under DDP: a DistributedSampler
        DataLoader(test_set, batch_size=256),
        use_distributed_sampler=True,
    )
    no_sync = (lambda: fabric.no_backward_sync(model)) if fabric.world_size > 1 else None

    started = time.perf_counter()
    sharpness = torch.zeros(())
    steps = 0
    for epoch in range(epochs):
        model.train()
        loss_sum, sharp_sum, batches = torch.zeros(()), torch.zeros(()), 0
        for x, y in train_loader:
            losses: list[torch.Tensor] = []

            def closure(x: torch.Tensor = x, y: torch.Tensor = y, losses: list = losses) -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)  # pass 1 at w, pass 2 at w + e
                fabric.backward(loss)
                losses.append(loss.detach())
                return loss

            # pass 1, ascent, pass 2, descent, exact restore, BAR's pre-step hook, optimizer.step(); under DDP the
            # passes that must stay local run inside no_backward_sync (forward and backward)
            loss1 = engine.step(closure, optimizer, no_sync=no_sync, sync_ascent=args.sync_ascent)
            if len(losses) > 1:
                sharp_sum += losses[-1] - losses[0]
            loss_sum += loss1.detach()
            batches += 1
            steps += 1
        sharpness = sharp_sum / max(batches, 1)
        test_acc = evaluate(fabric, model, test_loader)
        fabric.print(
            f"epoch {epoch + 1:3d}  train loss {(loss_sum / max(batches, 1)).item():.4f}  "
            f"sharpness {sharpness.item():+.4f}  test acc {test_acc:.4f}"
        )
    seconds = time.perf_counter() - started
    run = f"{args.variant}, {args.precision}, {fabric.world_size} process(es)"
    fabric.print(f"{steps} steps per process in {seconds:.1f} s ({run})")
    return {"steps": steps, "test_acc": test_acc, "sharpness": float(sharpness), "seconds": seconds}


@torch.no_grad()
def evaluate(fabric: Fabric, model: nn.Module, loader: DataLoader) -> float:
    """Accuracy over the whole test set (each rank scores its shard; the counts are summed over ranks)."""
    model.eval()
    counts = torch.zeros(2)
    for x, y in loader:
        counts += torch.tensor([(model(x).argmax(-1) == y).sum().item(), y.numel()], dtype=torch.float32)
    counts = fabric.all_reduce(counts, reduce_op="sum")
    return float(counts[0] / counts[1])


if __name__ == "__main__":
    main()
