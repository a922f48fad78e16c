"""BAR's per-step cost against the plain LoRA step and against SAM, in the same run (a benchmark, not a test).

Model: a BERT built from a config (random init, no downloads) with peft LoRA adapters (r=8) on query, key, value,
every dense layer and the word embeddings, the classifier head trained in full (peft's SEQ_CLS default); AdamW on
the trained parameters; synthetic token batches. Two sizes (``--models``):

* ``tiny``: hidden 64, 2 layers, sequence 24, batch 32 (the example's model), 14 LoRA pairs;
* ``small``: hidden 128, 4 layers, sequence 32, batch 16, 26 LoRA pairs.

Rows, each one training step:

====================  =====================================================================================
engine_plain          plain PyTorch loop: forward/backward + ``optimizer.step()`` (the plain LoRA step)
engine_bar            the same + ``SAMEngine("bar")``: ``plain_step()``, ``before_optimizer_step(optimizer)``
engine_sam            ``SAMEngine("sam")``: pass 1, ascend, pass 2, descend, step
lightning_plain       ``Trainer.fit`` of the same model, no callback
lightning_bar         ``callbacks=[SAMCallback("bar")]`` (logs the balancedness every 50 steps, Lightning's default)
lightning_sam         ``callbacks=[SAMCallback("sam")]``
====================  =====================================================================================

Lightning steps are timed by a callback from ``on_train_batch_start`` to ``on_train_batch_end``. Noise handling
as in ``bench/step_overhead.py``: the rows are interleaved (each repeat runs every row once), a run's value is
its median step, the reported value the median over ``--repeats`` runs (min..max of the run medians shown); wall
time and process CPU time are both recorded, one torch thread by default (on a shared 2-core machine CPU time is
the stabler clock). Also reported: the BAR hook alone (``before_optimizer_step``) and one ``metrics()`` call, in µs.

Usage::

    python bench/bar_overhead.py                  # both models, ~3 min on 2 cores
    python bench/bar_overhead.py --models small --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared Trainer factory of bench/

from lightning_sam import SAMCallback, SAMEngine

MODELS = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "length": 24, "batch": 32},
    "small": {"hidden": 128, "layers": 4, "heads": 4, "length": 32, "batch": 16},
}
ROWS = ("engine_plain", "engine_bar", "engine_sam", "lightning_plain", "lightning_bar", "lightning_sam")
VOCAB = 1000


def lora_model(size: str) -> nn.Module:
    spec = MODELS[size]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=4 * spec["hidden"],
        max_position_embeddings=spec["length"],
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    targets = ["query", "key", "value", "dense", "word_embeddings"]
    return get_peft_model(
        BertForSequenceClassification(config), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=targets)
    )


def batches(size: str, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = MODELS[size]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (count * spec["batch"], spec["length"]), generator=generator)
    labels = torch.randint(0, 2, (count * spec["batch"],), generator=generator)
    return list(zip(tokens.split(spec["batch"]), labels.split(spec["batch"])))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, labels = batch
    return F.cross_entropy(model(input_ids=tokens).logits, labels)


def run_engine(row: str, base: nn.Module, data: list, warmup: int) -> timing.StepTimes:
    model = copy.deepcopy(base)
    optimizer = make_optimizer(model)
    engine = None
    if row != "engine_plain":
        options = {"total_steps": len(data)} if row == "engine_bar" else {}
        engine = SAMEngine.from_optimizer(optimizer, model, row.removeprefix("engine_"), **options)
    times = timing.StepTimes()
    for i, batch in enumerate(data):
        start = timing.clocks()
        if row == "engine_sam":

            def closure(batch=batch) -> torch.Tensor:
                optimizer.zero_grad()
                loss = loss_of(model, batch)
                loss.backward()
                return loss

            engine.step(closure, optimizer)  # type: ignore[union-attr]
        else:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            if engine is not None:
                engine.plain_step()
                engine.before_optimizer_step(optimizer)
            optimizer.step()
        if i >= warmup:
            times.add(start, timing.clocks())
    return times


class Module(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_of(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self)


def run_lightning(row: str, base: nn.Module, data: list, warmup: int) -> timing.StepTimes:
    timer = timing.LightningTimer()
    callbacks: list[L.Callback] = [timer]
    if row != "lightning_plain":
        callbacks.append(SAMCallback(row.removeprefix("lightning_")))
    tokens, labels = (torch.cat(t) for t in zip(*data))
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=len(data[0][1]), shuffle=False)
    trainer = wl.make_trainer(torch.device("cpu"), -1, callbacks)  # one epoch
    trainer.fit(Module(copy.deepcopy(base)), loader)
    return timer.step_times(warmup, cycles=False)  # on_train_batch_start to on_train_batch_end


def hook_microseconds(base: nn.Module, data: list, calls: int = 200) -> tuple[float, float, int]:
    """The BAR hook alone and one metrics() call (µs), on real gradients; and the number of pairs."""
    model = copy.deepcopy(base)
    optimizer = make_optimizer(model)
    engine = SAMEngine.from_optimizer(optimizer, model, "bar", schedule="constant")
    loss_of(model, data[0]).backward()
    engine.plain_step()
    engine.before_optimizer_step(optimizer)
    started = time.perf_counter()
    for _ in range(calls):
        engine.before_optimizer_step(optimizer)
    hook = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for _ in range(calls):
        engine.variant.metrics()
    metrics = (time.perf_counter() - started) / calls * 1e6
    return hook, metrics, len(engine.variant.found_pairs)


def summarize(runs: list[timing.StepTimes], clock: str) -> dict[str, float]:
    """The median of the runs' median steps and their min..max, in ms."""
    s = timing.spread(statistics.median(r.get(clock)) for r in runs)
    return {"median": s["ms"], "min": s["min"], "max": s["max"]}


def bench(size: str, args: argparse.Namespace) -> dict[str, Any]:
    base = lora_model(size)
    data = batches(size, args.warmup + args.steps)
    runners: dict[str, Callable[[str, nn.Module, list, int], timing.StepTimes]] = {
        row: run_engine if row.startswith("engine") else run_lightning for row in args.rows
    }
    runs = timing.interleave(
        args.rows,
        lambda row: runners[row](row, base, data, args.warmup),
        args.repeats,
        prime=lambda row: runners[row](row, base, data[: args.warmup + 2], args.warmup),  # first-call costs
    )
    hook, metrics, pairs = hook_microseconds(base, data)
    trained = sum(p.numel() for p in base.parameters() if p.requires_grad)
    return {
        "model": size,
        "pairs": pairs,
        "trained_parameters": trained,
        "rows": {row: {clock: summarize(r, clock) for clock in timing.CLOCKS} for row, r in runs.items()},
        "hook_us": hook,
        "metrics_us": metrics,
    }


RATIOS = [
    ("engine_bar", "engine_plain"),
    ("lightning_bar", "lightning_plain"),
    ("engine_bar", "engine_sam"),
    ("lightning_bar", "lightning_sam"),
    ("engine_sam", "engine_plain"),
]


def report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(
        f"\nmodel {result['model']}: {result['pairs']} LoRA pairs, "
        f"{result['trained_parameters']:,} trained parameters; "
        f"BAR hook {result['hook_us']:.0f} µs/step, metrics() {result['metrics_us']:.0f} µs/call"
    )
    print(f"{'row':<16} {'wall ms':>9} {'(min..max)':>16} {'cpu ms':>9} {'(min..max)':>16}")
    for row, clocks in rows.items():
        w, c = clocks["wall"], clocks["cpu"]
        print(
            f"{row:<16} {w['median']:>9.2f} {w['min']:>7.2f}..{w['max']:<7.2f} "
            f"{c['median']:>9.2f} {c['min']:>7.2f}..{c['max']:<7.2f}"
        )
    for a, b in RATIOS:
        if a in rows and b in rows:
            wall = rows[a]["wall"]["median"] / rows[b]["wall"]["median"]
            cpu = rows[a]["cpu"]["median"] / rows[b]["cpu"]["median"]
            print(f"{a} / {b}: {wall:.3f}x wall, {cpu:.3f}x cpu")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "small"])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per row (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {args.steps} timed steps x {args.repeats} interleaved repeats"
    )
    results = []
    for size in args.models:
        results.append(bench(size, args))
        report(results[-1])
    if args.json:
        timing.write_json(args.json, results, note=None)
    return results


if __name__ == "__main__":
    main()
