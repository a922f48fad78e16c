"""2-process DDP on CPU (gloo): gradient all-reduces per step and step time, SGD vs SAM (local pass 1) vs
SAM with ``sync_ascent=True``. Not a test: prints a table of counts and ratios.

    python bench/ddp_allreduce.py                 # all three modes, one subprocess each
    python bench/ddp_allreduce.py --steps 60 --width 1024

Each mode runs ``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` on a synthetic MLP. A counting DDP
comm hook (registered on the DDP model, since Lightning registers hooks only on CUDA) counts bucket all-reduces;
step times are medians over the steps after a warm-up, measured on rank 0 from on_train_batch_start to
on_train_batch_end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

MODES = ("sgd", "sam_local", "sam_sync_ascent")


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sam import SAMCallback

    torch.set_num_threads(1)  # two processes on two cores

    class Counter:
        def __init__(self) -> None:
            self.count = 0
            self.process_group = None

    def counting_hook(state: Counter, bucket):
        state.count += 1
        return default_hooks.allreduce_hook(state.process_group, bucket)

    class Probe(Callback):
        def __init__(self, counter: Counter) -> None:
            self.counter = counter
            self.times: list[float] = []
            self.counts: list[int] = []

        def on_fit_start(self, trainer, pl_module):
            trainer.strategy.model.register_comm_hook(self.counter, counting_hook)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start, self._count = time.perf_counter(), self.counter.count

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._start)
            self.counts.append(self.counter.count - self._count)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Linear(64, args.width), nn.ReLU()]
            for _ in range(args.depth - 2):
                layers += [nn.Linear(args.width, args.width), nn.ReLU()]
            layers.append(nn.Linear(args.width, 10))
            self.net = nn.Sequential(*layers)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    torch.manual_seed(0)
    n = 2 * args.batch_size * (args.steps + args.warmup)
    data = TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    counter = Counter()
    probe = Probe(counter)
    callbacks: list[Callback] = [probe]
    if args.mode == "sam_local":
        callbacks.append(SAMCallback("sam"))
    elif args.mode == "sam_sync_ascent":
        callbacks.append(SAMCallback("sam", sync_ascent=True))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=120)),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=args.batch_size))
    if trainer.global_rank == 0:
        measured = probe.times[args.warmup :]
        result = {
            "mode": args.mode,
            "median_ms": 1000 * statistics.median(measured),
            "allreduces_per_step": statistics.mean(probe.counts[args.warmup :]),
        }
        with open(args.result, "w") as handle:
            json.dump(result, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            path = os.path.join(tmp, f"{mode}.json")
            command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--mode", mode, "--result", path]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(path) as handle:
                results[mode] = json.load(handle)
    base = results["sgd"]["median_ms"]
    print(f"2-process DDP (gloo, CPU), MLP depth {args.depth} width {args.width}, batch {args.batch_size}/rank")
    print("(SGD's count is the number of DDP buckets: the all-reduces of one synchronized backward)")
    print("| mode | all-reduces / step | median step (ms) | vs SGD |")
    print("| --- | ---: | ---: | ---: |")
    for mode in MODES:
        r = results[mode]
        print(f"| {mode} | {r['allreduces_per_step']:.2f} | {r['median_ms']:.1f} | {r['median_ms'] / base:.2f}x |")
    local, synced = results["sam_local"]["median_ms"], results["sam_sync_ascent"]["median_ms"]
    print(f"sam_local / sam_sync_ascent: {local / synced:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
