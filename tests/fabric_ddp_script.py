"""Run by tests/test_fabric.py as ``python tests/fabric_ddp_script.py OUT_DIR``: SAMEngine under Lightning Fabric,
2-process DDP (gloo, CPU).

Fabric's default DDP launcher re-runs this script for rank 1. Both ranks then train, one after the other in the same
process group, a fresh model for each way of writing pass 1 (``MODES``), 5 SAM steps each, and write
``OUT_DIR/fabric_rank{r}.pt``: per mode, the final weights and the number of gradient buckets that a counting DDP comm
hook saw all-reduced.

* ``local``: pass 1's forward *and* backward inside ``fabric.no_backward_sync(model)``; pass 2 outside it.
* ``forward_only``: only pass 1's forward inside ``no_backward_sync``, its backward outside: local as well.
* ``backward_only``: only pass 1's ``fabric.backward`` inside ``no_backward_sync`` (its forward outside): DDP decides
  in ``forward`` whether the coming backward all-reduces, so this still all-reduces pass 1.
* ``sync``: no ``no_backward_sync`` at all: both passes all-reduce (global-gradient SAM).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(__file__))

from conftest import make_data, make_mlp, make_optimizer
from ddp_script import BATCH_SIZE, N_SAMPLES
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from script_exit import finish
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lightning_sam import SAMEngine
from lightning_sam.distributed import all_reduce_sum_

MODES = ("local", "forward_only", "backward_only", "sync")


class CountingState:
    def __init__(self) -> None:
        self.count = 0
        self.process_group = None


def counting_allreduce(state: CountingState, bucket):
    state.count += 1
    return default_hooks.allreduce_hook(state.process_group, bucket)


def train(fabric: Fabric, mode: str) -> dict:
    model = make_mlp()
    optimizer = make_optimizer("sgd", model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    ddp = model._forward_module  # Fabric's wrapper holds the DDP module here; Fabric registers no hook on CPU
    assert isinstance(ddp, DistributedDataParallel), type(ddp)
    state = CountingState()
    ddp.register_comm_hook(state, counting_allreduce)
    engine = SAMEngine.from_optimizer(optimizer, model.module, "sam", rho=0.05)
    engine.set_all_reduce(all_reduce_sum_)
    # shuffle=True: Fabric swaps in DistributedSampler(shuffle=True, seed=0), the sampler Lightning's Trainer uses,
    # so tests/test_ddp.py's references apply unchanged.
    loader = fabric.setup_dataloaders(DataLoader(make_data(N_SAMPLES), batch_size=BATCH_SIZE, shuffle=True))
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        if mode == "local":
            with fabric.no_backward_sync(model, enabled=True):
                fabric.backward(F.cross_entropy(model(x), y))
        elif mode == "forward_only":
            with fabric.no_backward_sync(model, enabled=True):
                loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
        elif mode == "backward_only":
            loss = F.cross_entropy(model(x), y)
            with fabric.no_backward_sync(model, enabled=True):
                fabric.backward(loss)
        else:
            fabric.backward(F.cross_entropy(model(x), y))
        engine.ascend()
        optimizer.zero_grad()
        fabric.backward(F.cross_entropy(model(x), y))  # pass 2 at w + e: all-reduced on every mode
        engine.descend()
        engine.before_optimizer_step(optimizer)
        optimizer.step()
        steps += 1
    return {
        "weights": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "allreduce_count": state.count,
        "steps": steps,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    fabric = Fabric(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)), precision="32-true"
    )
    fabric.launch()
    results = {mode: train(fabric, mode) for mode in MODES}
    torch.save(results, os.path.join(out_dir, f"fabric_rank{fabric.global_rank}.pt"))
    fabric.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    finish()  # destroy the process group, exit without finalization (see script_exit)
