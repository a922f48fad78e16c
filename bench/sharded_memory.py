"""SAM's extra memory per rank under DDP and under FSDP2 (a benchmark script, not a test).

Two gloo processes on the CPU train the same model for a few optimizer steps with ``SAMCallback(variant)``, for the
variants ``sam``, ``fsam`` and ``ssam`` (Fisher mask from each rank's first batch, sparsity 0.5, ``storage="sparse"``),
under two strategies:

* ``ddp``: ``Trainer(strategy="ddp", devices=2)``: every rank holds every parameter whole;
* ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``fully_shard`` on every
  Linear and then on the network (``self.net``, the module ``training_step`` calls) in ``configure_model``: every
  parameter is a DTensor and a rank holds its shard.

What is measured, exactly, from the tensors (not from the process RSS), on each rank at ``on_train_end`` (after the
last step, with the engine's state fully allocated):

* **parameters per rank**: ``numel * element_size`` of the rank's part of each parameter (``p.to_local()`` of a
  DTensor, the whole tensor under DDP);
* **SAM saved copy per rank**: the engine's copy of the weights, ``engine._saved_views`` (views of one flat buffer
  per device and dtype): ``untyped_storage().nbytes()`` of the distinct storages (deduplicated by ``data_ptr()``);
  SSAM saves the kept coordinates only, in its own buffers (``variant._saved``);
* **variant state per rank**: F-SAM's EMA of the gradients, ``engine.variant._ema`` (name -> tensor), counted the
  same way (none for ``sam``); SSAM's kept indices (int32) and its scratch buffer;
* the model's total parameter count (global ``numel``, the same under both strategies).

``SAM extra`` is saved copy + variant state; the table gives it as a ratio of the rank's parameter bytes (about
1 for ``sam``, 2 for ``fsam`` under either strategy) and the last lines the ratio FSDP2 / DDP of the extra bytes
per rank (about 1 / world = 0.5: the extra follows the shards). Models: bench/workloads.py's (default ``mlp48``,
48 x (Linear 128 + LayerNorm + GELU) + head, 800k parameters); synthetic batches, each rank its own
(``use_distributed_sampler=False``), SGD with momentum.

Usage::

    python bench/sharded_memory.py                   # 4 fits (ddp, fsdp2) x (sam, fsam), one subprocess each
    python bench/sharded_memory.py --model mlp --json sharded_memory.json

One invocation with ``--strategy`` and ``--variant`` runs one fit (Lightning's launcher re-runs the script for
rank 1) and rank 0 writes the ranks' numbers to ``--result``; without them the script is the driver that runs the
four fits as subprocesses and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared setup and tables of bench/
import workloads as wl  # the shared models, batches and LightningModule of bench/

from lightning_sam import SAMCallback

STRATEGIES = ("ddp", "fsdp2")
VARIANTS = ("sam", "fsam", "ssam")
WORLD = 2
OPTIONS = {"ssam": {"sparsity": 0.5, "mask_every": 100, "storage": "sparse"}}  # Fisher mask from the first batch
MB = 2**20
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")  # set by Lightning's launcher for its child processes

# ---------------------------------------------------------------------------------------------------- measuring


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one buffer count once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def local_tensor(p: Tensor) -> Tensor:
    """The rank's part of a parameter: the local shard of a DTensor, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


class MemoryProbe(Callback):
    """At the end of training: each rank's parameter, saved-copy and variant-state bytes, gathered on every rank."""

    def __init__(self) -> None:
        self.ranks: list[dict[str, Any]] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        sam = next(c for c in trainer.callbacks if isinstance(c, SAMCallback))  # type: ignore[attr-defined]
        assert sam.driver is not None
        engine = sam.driver.engine
        params = list(pl_module.parameters())
        variant = engine.variant
        saved = list(engine._saved_views or []) + list(getattr(variant, "_saved", {}).values())
        ema = list(getattr(variant, "_ema", {}).values())
        ema += [i for i in getattr(variant, "_device_index", {}).values() if i is not None]  # SSAM's kept indices
        ema += list(getattr(variant, "_scratch", {}).values())
        mine = {
            "rank": trainer.global_rank,
            "engine_steps": engine.step_count,
            "param_count": sum(p.numel() for p in params),
            "param_tensors": len(params),
            "dtensor_params": sum(isinstance(p, DTensor) for p in params),
            "param_bytes": sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in params),
            "saved_bytes": storage_bytes(saved),
            "saved_storages": len({v.untyped_storage().data_ptr() for v in saved}),
            "saved_views": len(saved),
            "variant_bytes": storage_bytes(ema),
            "variant_tensors": len(ema),
        }
        self.ranks = [{} for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(self.ranks, mine)


# ---------------------------------------------------------------------------------------------------- one fit


class ShardedModule(wl.BenchModule):
    """bench/workloads.py's module, with ``configure_model`` (FSDP2) and each rank's own batches."""

    def __init__(self, spec: wl.ModelSpec, strategy: str, steps: int) -> None:
        super().__init__(wl.make_model(spec, torch.device("cpu")))
        self.spec, self.strategy, self.steps = spec, strategy, steps

    def configure_model(self) -> None:
        if self.strategy != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def train_dataloader(self) -> DataLoader:
        batches = wl.make_batches(self.spec, torch.device("cpu"), WORLD * self.steps)
        return DataLoader(wl.Batches(batches[self.global_rank :: WORLD]), batch_size=None)


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_samples": args.batch} if args.variant == "ssam" else {}


def worker(args: argparse.Namespace) -> None:
    timing.quiet()
    torch.set_num_threads(1)  # two processes on two cores
    spec = dataclasses.replace(wl.MODELS[args.model], batch=args.batch)
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    probe = MemoryProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=args.steps,
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[SAMCallback(args.variant, **OPTIONS.get(args.variant, {}), **batch_options(args)), probe],
    )
    start = time.perf_counter()
    trainer.fit(ShardedModule(spec, args.strategy, args.steps))
    if trainer.global_rank == 0:
        result = {"strategy": args.strategy, "variant": args.variant, "fit_s": time.perf_counter() - start}
        timing.write_json(args.result, {**result, "ranks": probe.ranks}, note=None)


# ---------------------------------------------------------------------------------------------------- driver


def run_fit(args: argparse.Namespace, strategy: str, variant: str, tmp: str) -> dict[str, Any]:
    path = os.path.join(tmp, f"{strategy}_{variant}.json")
    command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch", str(args.batch)]
    command += ["--steps", str(args.steps), "--strategy", strategy, "--variant", variant, "--result", path]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{strategy}/{variant} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    with open(path) as f:
        return json.load(f)


def per_rank(result: dict[str, Any], key: str, scale: float = MB, digits: int = 3) -> str:
    """The ranks' values of ``key``: one number when they agree, ``rank 0 / rank 1`` otherwise."""
    values = [f"{r[key] / scale:.{digits}f}" for r in result["ranks"]]
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def extra(rank: dict[str, Any]) -> int:
    return rank["saved_bytes"] + rank["variant_bytes"]


def report(results: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace) -> None:
    first = next(iter(results.values()))["ranks"][0]
    print(
        f"model {args.model}: {first['param_count']:,} parameters in {first['param_tensors']} tensors, fp32; "
        f"{WORLD} gloo processes on CPU, batch {args.batch} per rank, {args.steps} optimizer steps"
    )
    header = [
        "strategy",
        "variant",
        "parameters per rank (MB)",
        "SAM saved copy per rank (MB)",
        "variant state per rank (MB)",
        "SAM extra / parameters per rank",
    ]
    rows = []
    for (strategy, variant), result in results.items():
        ratios = [f"{extra(r) / r['param_bytes']:.3f}" for r in result["ranks"]]
        rows.append(
            [
                strategy,
                variant,
                per_rank(result, "param_bytes"),
                per_rank(result, "saved_bytes"),
                per_rank(result, "variant_bytes"),
                ratios[0] if len(set(ratios)) == 1 else " / ".join(ratios),
            ]
        )
    print(timing.md_table(header, rows))
    print()
    for variant in VARIANTS:
        if ("ddp", variant) in results and ("fsdp2", variant) in results:
            ddp, fsdp = results["ddp", variant]["ranks"], results["fsdp2", variant]["ranks"]
            ratios = " / ".join(f"{extra(f) / extra(d):.4f}" for d, f in zip(ddp, fsdp))
            print(f"{variant}: SAM extra per rank, FSDP2 / DDP = {ratios} (rank 0 / rank 1; 1 / world = {1 / WORLD})")
    for result in results.values():
        for r in result["ranks"]:
            if r["engine_steps"] != args.steps:
                print(f"note: {result['strategy']}/{result['variant']} rank {r['rank']}: {r['engine_steps']} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp48", choices=sorted(wl.MODELS), help="bench/workloads.py model")
    parser.add_argument("--batch", type=int, default=32, help="batch per rank (default 32)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per fit (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)  # one fit (internal)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategy is not None:
        worker(args)
        return
    torch.set_num_threads(1)  # what each worker uses (the environment line reports it)
    start = time.perf_counter()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            for variant in VARIANTS:
                results[strategy, variant] = result = run_fit(args, strategy, variant, tmp)
                print(f"[{strategy}/{variant}] fit {result['fit_s']:.1f} s", flush=True)
    print()
    report(results, args)
    env = timing.environment(torch.device("cpu"), model=args.model, batch=args.batch, steps=args.steps, world=WORLD)
    timing.finish(env, time.perf_counter() - start, [*results.values()], args.json)


if __name__ == "__main__":
    main()
