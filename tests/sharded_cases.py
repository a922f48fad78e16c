"""The sharded-training cases (tests/test_sharded.py): one model, its data, and how each case configures SAM.

A case runs under one of three layouts:

* ``fsdp``: ModelParallelStrategy(data_parallel_size=2), ``fully_shard`` on every Linear and on the root; rank ``r``
  trains on its own half of each batch;
* ``tp``: ModelParallelStrategy(tensor_parallel_size=2), the first Linear column-wise and the second row-wise
  (the LayerNorm and the head stay plain tensors, held whole by both ranks); both ranks see the whole batch;
* ``fsdp_tp``: both on 4 ranks (2 x 2 mesh): tensor parallel inside each data-parallel pair, FSDP2 across;
* ``single-<layout>``: one process on the union of what the ranks of that layout see (fsdp: batch ``i``
  = rank 0's batch ``i`` then rank 1's): the reference the sharded run must equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAMCallback, SAMMixin

SAMPLES, RANK_BATCH, FEATURES, CLASSES = 64, 8, 8, 3


@dataclass
class Case:
    variant: str
    options: dict[str, Any] = field(default_factory=dict)
    mixin: bool = False
    precision: str = "32-true"
    epochs: int = 2
    optimizer: str = "sgd"
    sam: bool = True  # False: the same training without SAM
    save_every_epoch: bool = False  # a ModelCheckpoint at every epoch end (in <root>/checkpoints)
    weights_only: bool = False  # that ModelCheckpoint saves the weights only (save_weights_only=True)
    resume_from: str | None = None  # resume from the epoch-0 checkpoint of this case (run first, same out dir)
    union_options: dict[str, Any] = field(default_factory=dict)  # options of the one-process run on the union batch

    def options_for(self, layout: str) -> dict[str, Any]:
        """The variant's options under ``layout`` (the one process on the data-parallel union may differ: SSAM's
        ``num_samples`` counts per data-parallel rank)."""
        union = layout.startswith("single") and layout != "single-tp"
        return {**self.options, **self.union_options} if union else dict(self.options)

    def without_sam(self) -> Case:
        """The same run with plain optimizer steps (automatic optimization, no callback)."""
        return Case(self.variant, self.options, False, self.precision, self.epochs, self.optimizer, sam=False)


# SSAM's Fisher mask from 8 samples per data-parallel rank (each rank's whole batch) = 16 on the union batch
FISHER = {"sparsity": 0.7, "num_samples": RANK_BATCH, "mask_every": 2}


CASES = {
    "sam": Case("sam"),
    "plain": Case("sam", sam=False),
    "asam": Case("asam"),
    "fsam": Case("fsam", {"adaptive": True}),
    "looksam": Case("looksam", {"k": 2}),
    "xsam": Case("xsam", {"steps": 2, "alpha_every": 3}),
    "interval": Case("sam", {"interval": 2}),
    "mixin_fsam": Case("fsam", mixin=True, optimizer="adamw"),
    "bf16": Case("sam", {"rho": 0.2}, precision="bf16-mixed"),
    "bf16_true": Case("fsam", {"rho": 0.2}, precision="bf16-true"),
    # resume at an epoch boundary: per-shard state (F-SAM's EMA, LookSAM's g_v) written per rank through Lightning's
    # distributed checkpoint (callback and mixin); the resumed run must end bit-identical to the uninterrupted one
    "fsam_straight": Case("fsam", epochs=3, save_every_epoch=True),
    "fsam_resumed": Case("fsam", epochs=3, resume_from="fsam_straight"),
    "looksam_straight": Case("looksam", {"k": 3}, epochs=3, save_every_epoch=True),
    "looksam_resumed": Case("looksam", {"k": 3}, epochs=3, resume_from="looksam_straight"),
    "mixin_fsam_straight": Case("fsam", mixin=True, optimizer="adamw", epochs=3, save_every_epoch=True),
    "mixin_fsam_resumed": Case("fsam", mixin=True, optimizer="adamw", epochs=3, resume_from="mixin_fsam_straight"),
    # a weights-only checkpoint holds no optimizer state, so no SAM state either (and training goes on)
    "mixin_fsam_weights_only": Case("fsam", mixin=True, optimizer="adamw", save_every_epoch=True, weights_only=True),
    # SSAM: masks selected over every shard (exact density, the one-process run's masks), Fisher sums over the
    # data-parallel ranks, sparsity 0 = SAM
    "ssam_fisher": Case("ssam", FISHER, union_options={"num_samples": 2 * RANK_BATCH}),
    "ssam_structured": Case(
        "ssam", {**FISHER, "pattern": "structured", "sparsity": 0.5}, union_options={"num_samples": 2 * RANK_BATCH}
    ),
    "ssam_nm": Case("ssam", {**FISHER, "pattern": "n:m"}, union_options={"num_samples": 2 * RANK_BATCH}),
    "ssam_sparse": Case("ssam", {**FISHER, "storage": "sparse"}, union_options={"num_samples": 2 * RANK_BATCH}),
    "ssam_dst": Case("ssam", {"mask": "dst", "sparsity": 0.7, "mask_every": 2}),
    "ssam_zero": Case("ssam", {"sparsity": 0.0}),
    "mixin_ssam": Case("ssam", FISHER, mixin=True, optimizer="adamw", union_options={"num_samples": 2 * RANK_BATCH}),
    "ssam_dst_straight": Case(
        "ssam", {"mask": "dst", "sparsity": 0.6, "mask_every": 3}, epochs=3, save_every_epoch=True
    ),
    "ssam_dst_resumed": Case(
        "ssam", {"mask": "dst", "sparsity": 0.6, "mask_every": 3}, epochs=3, resume_from="ssam_dst_straight"
    ),
    # refused at setup, before the first step, with a message that says what to do
    "refuse_ssam_nm": Case("ssam", {**FISHER, "pattern": "n:m"}),  # tensor parallel: row-wise splits the inputs
    "refuse_local_ascent": Case("sam", {"sync_ascent": False}),
}


def build_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, CLASSES),
    )


def shard(net: nn.Sequential, layout: str, mesh: Any) -> None:
    """Apply the layout's parallelism to ``net`` (in ``configure_model``); ``fsdp_tp``: tensor parallel inside each
    data-parallel group, then FSDP2 over the groups (a 2-D mesh)."""
    if layout in ("tp", "fsdp_tp"):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    if layout in ("fsdp", "fsdp_tp"):
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(net, mesh=mesh["data_parallel"])


class Net(L.LightningModule):
    def __init__(self, case: Case, layout: str) -> None:
        super().__init__()
        self.case, self.layout = case, layout
        self.net = build_net()

    def configure_model(self) -> None:
        shard(self.net, self.layout, self.device_mesh)

    def train_dataloader(self) -> DataLoader:
        single = self.layout.startswith("single")
        return loader(self.layout, 0 if single else self.device_mesh["data_parallel"].get_local_rank())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.case.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class MixinNet(SAMMixin, Net):
    def __init__(self, case: Case, layout: str) -> None:
        super().__init__(case, layout)
        self.automatic_optimization = False
        self.configure_sam(case.variant, **case.options_for(layout))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.sam_step(
            lambda: F.cross_entropy(self.net(x), y),
            sample_loss_fn=lambda i, j: F.cross_entropy(self.net(x[i:j]), y[i:j]),  # SSAM's Fisher mask
            batch_size=len(x),
        )


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    return x, torch.randint(0, CLASSES, (SAMPLES,), generator=generator)


def loader(layout: str, rank: int) -> DataLoader:
    """What ``rank`` trains on under ``layout``; ``single-fsdp`` / ``single-tp``: what the ranks of that layout train
    on together (fsdp: batch ``i`` is rank 0's batch ``i``, then rank 1's)."""
    return loader_of(*data(), layout, rank)


def loader_of(x: Tensor, y: Tensor, layout: str, rank: int) -> DataLoader:
    """:func:`loader` over the samples ``x``, ``y`` (the first half is data-parallel rank 0's, the second rank 1's)."""
    half = len(x) // 2
    if layout in ("fsdp", "fsdp_tp"):
        part = slice(rank * half, (rank + 1) * half)
        return DataLoader(TensorDataset(x[part], y[part]), batch_size=RANK_BATCH)
    if layout in ("tp", "single-tp"):
        return DataLoader(TensorDataset(x[:half], y[:half]), batch_size=RANK_BATCH)
    # single-fsdp, the union: batch i = rank 0's batch i, then rank 1's batch i
    starts = [start + offset for start in range(0, half, RANK_BATCH) for offset in (0, half)]
    order = torch.cat([torch.arange(start, start + RANK_BATCH) for start in starts])
    return DataLoader(TensorDataset(x[order], y[order]), batch_size=2 * RANK_BATCH)


def trainer_for(case: Case, layout: str, root: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": case.epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,  # the metrics of the last step (global values) are compared
        "default_root_dir": root,
        "use_distributed_sampler": False,
        "precision": case.precision,
        "callbacks": [SAMCallback(case.variant, **case.options_for(layout))] if case.sam and not case.mixin else [],
    }
    if not layout.startswith("single"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = {"fsdp": (2, 1), "tp": (1, 2), "fsdp_tp": (2, 2)}[layout]
        options.update(devices=dp * tp, strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp))
    else:
        options.update(devices=1)
    if case.precision == "16-mixed-cpu":
        options.pop("precision")
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    if case.save_every_epoch:
        from lightning.pytorch.callbacks import ModelCheckpoint

        options["enable_checkpointing"] = True
        checkpoint = ModelCheckpoint(
            dirpath=root / "checkpoints", save_top_k=-1, every_n_epochs=1, save_weights_only=case.weights_only
        )
        options["callbacks"] = [*options["callbacks"], checkpoint]
    options.update(kwargs)
    return L.Trainer(**options)


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter whole (DTensors gathered), detached, on CPU."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
        for name, p in module.named_parameters()
    }


def fit(case: Case, layout: str, root: Path, **kwargs: Any) -> tuple[dict[str, Tensor], dict[str, float], int]:
    """Train ``case`` under ``layout``; returns the full weights, the logged metrics and the global rank."""
    trainer = trainer_for(case, layout, root, **kwargs)
    module = (MixinNet if case.mixin else Net)(case, layout)
    ckpt_path = None
    if case.resume_from is not None:
        ckpt_path = str(next((root.parent / case.resume_from / "checkpoints").glob("epoch=0-*")))
    trainer.fit(module, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return full_weights(module.net), metrics, trainer.global_rank
