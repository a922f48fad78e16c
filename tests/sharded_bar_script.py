"""BAR on peft LoRA factors under Lightning's ModelParallelStrategy on 2 CPU processes (gloo).

Run by tests/test_sharded_bar.py as ``python sharded_bar_script.py <out_dir> <case> [<case> ...]``: each case is one
``Trainer.fit`` (the same two processes run them one after the other, each under its layout's strategy); rank 0
writes ``<out_dir>/results.pt`` with each case's trained weights (whole) and logged metrics. The test imports the
model, the data and :func:`fit` from here for the one-process reference runs.

The model: a tiny BERT built from a config (random init, no download) with peft LoRA on ``query``, ``value`` and the
word embeddings (both factors random, so that both get gradients from the first step), and the classifier trained in
full. BAR runs through ``SAMCallback``, or through ``SAMMixin.sam_step`` (the ``*_mixin`` cases). Layouts:

* ``fsdp``: ModelParallelStrategy(data_parallel_size=2), ``fully_shard`` on the first encoder block and on the
  root; rank ``r`` trains on its own half of each batch. Every factor is split over the two ranks (dim 0).
* ``tp``: ModelParallelStrategy(tensor_parallel_size=2): the LoRA of the first block's ``query`` and ``value``
  split (``lora_A`` column-wise, ``lora_B`` row-wise: each rank holds half of the rank-r dimension); every other
  pair stays a plain tensor that both ranks hold whole (counted once in the norms). Both ranks see the whole batch.
* ``single-fsdp`` / ``single-tp``: one process on the union of what the ranks of that layout see (fsdp: batch
  ``i`` = rank 0's batch ``i`` then rank 1's): the reference the sharded run must equal.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_sam import SAMCallback, SAMMixin

sys.path.insert(0, os.path.dirname(__file__))

from script_exit import finish
from sharded_cases import SAMPLES, loader_of

torch.set_num_threads(1)
warnings.filterwarnings("ignore")  # Lightning's and torch's notes on CPU, workers and DTensor

VOCAB, LENGTH = 32, 8


@dataclass
class Case:
    layout: str  # "fsdp" or "tp"
    options: dict[str, Any] = field(default_factory=dict)  # SAMCallback("bar", **options); None: no callback
    bar: bool = True
    mixin: bool = False  # SAMMixin's sam_step (manual optimization) instead of the callback


CASES = {
    "fsdp_nbar": Case("fsdp", {"mu0": 2.0}),
    "fsdp_obar": Case("fsdp", {"mu0": 2.0, "rule": "obar", "schedule": "cosine"}),
    "tp_nbar": Case("tp", {"mu0": 2.0}),
    "tp_obar": Case("tp", {"mu0": 2.0, "rule": "obar", "schedule": "constant"}),
    "fsdp_nbar_mixin": Case("fsdp", {"mu0": 2.0}, mixin=True),
    "tp_obar_mixin": Case("tp", {"mu0": 2.0, "rule": "obar", "schedule": "constant"}, mixin=True),
}


def build_model() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query", "value", "word_embeddings"],
        init_lora_weights=False,  # B random too: both factors of every pair get gradients from step 0
    )
    model = get_peft_model(BertForSequenceClassification(config), lora)
    for p in model.base_model.model.classifier.parameters():
        p.requires_grad_(True)  # a trained parameter outside the pairs: a plain optimizer step
    return model


def shard(model: nn.Module, layout: str, mesh: Any) -> None:
    """Apply the layout's parallelism (in ``configure_model``)."""
    bert = model.base_model.model.bert
    if layout == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {}
        for target in ("query", "value"):
            plan[f"{target}.lora_A.default"] = ColwiseParallel()  # (r, in): rows split, output split along r
            plan[f"{target}.lora_B.default"] = RowwiseParallel()  # (out, r): columns split, output all-reduced
        parallelize_module(bert.encoder.layer[0].attention.self, mesh["tensor_parallel"], plan)
    elif layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(bert.encoder.layer[0], mesh=mesh["data_parallel"])
        fully_shard(model, mesh=mesh["data_parallel"])


class LoRAClassifier(L.LightningModule):
    def __init__(self, case: Case, layout: str) -> None:
        super().__init__()
        self.case, self.layout = case, layout
        self.model = build_model()

    def configure_model(self) -> None:
        if not self.layout.startswith("single"):
            shard(self.model, self.layout, self.device_mesh)

    def train_dataloader(self) -> DataLoader:
        single = self.layout.startswith("single")
        return loader(self.layout, 0 if single else self.device_mesh["data_parallel"].get_local_rank())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return F.cross_entropy(self.model(input_ids=tokens).logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


class MixinLoRAClassifier(SAMMixin, LoRAClassifier):
    def __init__(self, case: Case, layout: str) -> None:
        super().__init__(case, layout)
        self.automatic_optimization = False
        self.configure_sam("bar", **case.options)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, labels = batch
        return self.sam_step(lambda: F.cross_entropy(self.model(input_ids=tokens).logits, labels))


def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=generator)
    return tokens, (tokens < VOCAB // 4).sum(1).gt(LENGTH // 4).long()


def loader(layout: str, rank: int) -> DataLoader:
    """What ``rank`` trains on under ``layout``; ``single-*``: what the ranks of that layout train on together."""
    return loader_of(*data(), layout, rank)


def trained_weights(module: nn.Module) -> dict[str, Tensor]:
    """Every trained parameter whole (DTensors gathered), detached, on CPU."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def fit(case: Case, layout: str, root: Path) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """Train ``case`` under ``layout`` (``case.layout``, or ``single-<layout>``); returns the trained weights, the
    logged metrics and the global rank."""
    callback = SAMCallback("bar", **case.options) if case.bar and not case.mixin else None
    options: dict[str, Any] = {}
    if not layout.startswith("single"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = {"fsdp": (2, 1), "tp": (1, 2)}[layout]
        options.update(devices=2, strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp))
    else:
        options.update(devices=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the metrics of the last step (global values) are compared
        default_root_dir=root,
        use_distributed_sampler=False,
        callbacks=[callback] if callback is not None else [],
        **options,
    )
    module = (MixinLoRAClassifier if case.bar and case.mixin else LoRAClassifier)(case, layout)
    trainer.fit(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    engine = callback.engine if callback is not None else getattr(module, "sam_engine", None)
    if engine is not None:  # how many ranks hold each factor's coordinates, as BAR's reduction counts them
        groups = engine.variant._groups
        metrics["holders"] = sorted({c for g in groups if g.reduction is not None for c in g.reduction.counts})
    return trained_weights(module.model), metrics, trainer.global_rank


def main(out: Path, cases: list[str]) -> None:
    results = {}
    rank = 0
    for name in cases:
        case = CASES[name]
        weights, metrics, rank = fit(case, case.layout, out / name)
        results[name] = {"weights": weights, "metrics": metrics}
    if rank == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    finish()  # destroy the process group, exit without finalization (see script_exit)
