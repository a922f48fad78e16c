"""SAMEngine in a Lightning Fabric loop under Fabric's ModelParallelStrategy: FSDP2 (``fully_shard``) on 2 CPU
processes (gloo).

Run by tests/test_fabric_sharded.py as ``python tests/fabric_sharded_script.py OUT_DIR [VARIANT ...]`` (default: every
variant of ``VARIANTS``). Fabric's launcher re-runs this script for rank 1. For each variant both ranks train a fresh
``sharded_cases.build_net()`` (the same init on both ranks), set up in the order FSDP2 needs: the model first
(``fabric.setup_module`` applies ``parallelize_fn``: ``fully_shard`` on every Linear, then on the root), then the
optimizer over the sharded parameters (DTensors) and ``fabric.setup_optimizers``. Rank ``r`` trains on its own half of
the data (``sharded_cases.loader("fsdp", r)``: samples ``32 r .. 32 r + 31``, batches of 8, no shuffle), 2 epochs, SGD
(lr 0.1, momentum 0.9), one ``engine.step(closure, optimizer, probe=...)`` per batch. Rank 0 writes
``OUT_DIR/fabric_sharded.pt``: per variant, the full weights (DTensors gathered), the engine's step count and the
variant's final state, and what each rank held (parameter elements, the engine's saved copy).

No ``no_sync`` is given to ``engine.step``: under FSDP2 every pass must reduce-scatter, since a rank's gradient shard
is only the global gradient of its slice once it is reduced (the Trainer's SAMCallback refuses a local pass 1 here).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))

from script_exit import finish
from sharded_cases import build_net, full_weights, loader

from lightning_sam import SAMEngine
from lightning_sam.distributed import gather_objects
from lightning_sam.rank_tensors import load_rank_state, save_rank_state
from lightning_sam.sharding import local

VARIANTS: dict[str, dict[str, Any]] = {
    "sam": {},
    "fsam": {},
    "xsam": {"alpha_every": 3},  # alpha searches at steps 0, 3 and 6: forward-only loss probes through FSDP2
    # Fisher masks at steps 0, 2, 4, 6 from each rank's 8 samples (per-sample gradients through FSDP2's unsharded
    # parameters, summed over the ranks): the one process takes the union batch's 16
    "ssam": {"sparsity": 0.7, "num_samples": 8, "mask_every": 2},
}
UNION_OPTIONS: dict[str, dict[str, Any]] = {"ssam": {"num_samples": 16}}
EPOCHS = 2


def parallelize(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the data-parallel mesh: every Linear its own unit, then the root (the LayerNorm's parameters)."""
    mesh = device_mesh["data_parallel"]
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(fabric: Fabric, variant: str, options: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Train a fresh net with ``variant``; returns (on every rank) its full weights and what this rank held, and
    whether its engine state comes back from ``save_rank_state`` / ``load_rank_state`` into a fresh engine."""
    model = fabric.setup_module(build_net())  # parallelize_fn runs here: the parameters become DTensor shards
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    # the Fabric wrapper is unwrapped to the user's module: its names key the state, its FSDP2 modules reshard
    engine = SAMEngine.from_optimizer(optimizer, model, variant, **options)
    assert engine.sharded and len(engine.fsdp_modules) == 4, (engine.sharded, engine.fsdp_modules)
    rank = fabric.global_rank
    batches = fabric.setup_dataloaders(loader("fsdp", rank), use_distributed_sampler=False)
    losses: list[float] = []
    for _ in range(EPOCHS):
        model.train()
        for x, y in batches:

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                return loss

            def probe(x: Tensor = x, y: Tensor = y) -> Tensor:
                return F.cross_entropy(model(x), y)  # forward only (XSAM's alpha search)

            if engine.samples_needed():  # SSAM's Fisher mask, before pass 1
                engine.collect_samples(lambda i, j, x=x, y=y: F.cross_entropy(model(x[i:j]), y[i:j]), len(x))
            losses.append(float(engine.step(closure, optimizer, probe=probe).detach()))
            assert not engine.is_perturbed
    try:  # no_sync would leave the shards without gradients: refused before any pass runs
        engine.step(closure, optimizer, no_sync=lambda: fabric.no_backward_sync(model))
        refused = ""
    except ValueError as error:
        refused = str(error)
    state_dir = os.path.join(out_dir, f"sam-{variant}")  # every rank writes its own state, none gathers
    save_rank_state(engine.state_dict(), state_dir)
    fresh = SAMEngine.from_optimizer(optimizer, model, variant, **options)
    fresh.load_state_dict(load_rank_state(state_dir))
    leaves = [torch.utils._pytree.tree_leaves(e.state_dict()) for e in (engine, fresh)]
    round_trip = len(leaves[0]) == len(leaves[1]) and all(
        torch.equal(a, b) if isinstance(a, Tensor) else a == b for a, b in zip(*leaves)
    )
    held = sum(local(p).numel() for p in model.parameters())
    saved = sum(view.numel() for view in engine._saved_views or [])
    return {
        "weights": full_weights(model.module),  # a collective (full_tensor): every rank gathers
        "steps": engine.step_count,
        "variant_state": engine.variant.state_dict(),
        "losses": losses,
        "held": held,
        "saved": saved,
        "no_sync_refused": refused,
        "state_round_trip": round_trip,
    }


def main(out_dir: str, variants: list[str]) -> None:
    torch.set_num_threads(1)
    strategy = ModelParallelStrategy(
        parallelize, data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)
    )
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="32-true")
    fabric.launch()
    results = {variant: train(fabric, variant, VARIANTS[variant], out_dir) for variant in variants}
    held = gather_objects({variant: (r["held"], r["saved"], r["state_round_trip"]) for variant, r in results.items()})
    for variant, result in results.items():
        per_rank = [ranks[variant] for ranks in held]
        result["held_per_rank"] = [(elements, saved) for elements, saved, _ in per_rank]  # (elements, saved copy)
        result["state_round_trip"] = all(round_trip for _, _, round_trip in per_rank)  # every rank's own state
    if fabric.global_rank == 0:
        torch.save(results, os.path.join(out_dir, "fabric_sharded.pt"))
    fabric.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
    finish()  # destroy the process group, exit without finalization (see script_exit)
