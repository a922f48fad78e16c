"""SSAM's cost against SAM: step time, extra memory, mask refresh time (a benchmark script, not a test).

Models and data are bench/step_overhead.py's (synthetic tensors only): ``cnn`` (3 x conv3x3 + BatchNorm + ReLU,
24k parameters, batch 64) and ``mlp`` (10 Linear layers of width 256, 594k parameters, batch 128); SGD with
momentum, cross-entropy. One run measures three things:

(a) **Step time**, plain PyTorch loops with ``SAMEngine``: ``plain`` (one forward/backward + step), ``floor2`` (two
    forward/backward + one step: the floor of any two-pass method), ``sam``, and ``ssam_s<sparsity>`` (Fisher mask,
    unstructured, for each ``--sparsities``). The SSAM mask is built before the timed steps and its refresh period
    is set past the run: these are steady-state SSAM steps. ``--lightning`` adds the same through ``Trainer.fit``
    (``lightning_plain``, ``lightning_sam``, ``lightning_ssam_s<sparsity>``; the callback's only Fisher pass of the
    fit runs in the warm-up steps). Timing as in step_overhead.py: methods interleaved, ``--repeats`` runs of
    ``--warmup`` + ``--steps`` steps, a run's value is its median step, the table the median of the runs (min..max);
    wall and process CPU time (the CPU clock is the one to trust on a shared machine with one thread).

(b) **Extra memory**. SAM's extra is one copy of the weights, ``sum(numel * element_size)`` over the trained
    parameters: the perturbed weights, which SAM builds in the pass-1 gradients' memory and keeps there through pass 2
    (pass 2 writes fresh gradients), or, where the engine cannot swap them in, its saved copy. SSAM's
    (``storage="sparse"``, the storage this benchmark times) is what the variant keeps per step on the parameters'
    device: the saved kept coordinates (``variant._saved``), the int32 flat indices
    (``variant._device_index``) and the shared scratch buffers (``variant._scratch``), each ``numel *
    element_size``; the last rows show the default ``storage="dense"`` (SAM's copy, as SAM holds it, and bool
    masks, ``variant._dense_masks``, in the index column). Printed for several
    masks and sparsities with the ratio SSAM extra / SAM extra. Also listed: the host-side int64 copy of the kept
    indices (``variant._kept``, on the CPU whatever the device: on a CPU run it is in the same memory) and the fp32
    Fisher partial sums that exist while a refresh spans several steps. With ``--device cuda`` it also measures
    ``torch.cuda.memory_allocated`` (persistent) and ``max_memory_allocated`` (per-step and refresh peaks) against
    SAM and floor2.

(c) **Refresh cost**. The Fisher mask: wall/CPU time of collecting ``num_samples = 128`` per-sample gradients with
    ``SAMEngine.collect_samples`` (BatchNorm on running statistics, as the callback runs them) for
    ``fisher_batch_size`` 1 and 8, including the mask selection (also shown alone), relative to one ``plain`` step
    and amortized over a refresh period of 100 steps. The DST mask: the time of one refresh (drop by ``|g|``, regrow
    at random, rebuild the index buffers), read from the variant's own refresh timer, relative to a ``plain`` step.

Usage::

    python bench/ssam_memory.py                          # defaults: cnn,mlp, CPU, 1 thread, ~2-4 min on 2 cores
    python bench/ssam_memory.py --lightning --json ssam.json
    python bench/ssam_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # the sibling benchmark: its plain/floor2 steps and its per-method summary
import timing  # the shared clocks, timers, statistics and tables of bench/
import workloads as wl  # the shared models, batches, LightningModule and Trainer of bench/

from lightning_sam import SAMCallback, SAMEngine

NEVER = wl.NEVER
MODELS = {name: wl.MODELS[name] for name in ("cnn", "mlp")}
FISHER_SAMPLES = 128
AMORTIZE_OVER = 100  # SAMEngine's default mask_every, in steps
MEMORY_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fisher unstructured s=0.5", {"sparsity": 0.5}),
    ("fisher unstructured s=0.7", {"sparsity": 0.7}),
    ("fisher unstructured s=0.9", {"sparsity": 0.9}),
    ("fisher unstructured s=0.99", {"sparsity": 0.99}),
    ("fisher structured s=0.5", {"sparsity": 0.5, "pattern": "structured"}),
    ("fisher structured s=0.9", {"sparsity": 0.9, "pattern": "structured"}),
    ("fisher 2:4", {"pattern": "n:m", "n": 2, "m": 4}),
    ("dst s=0.5", {"sparsity": 0.5, "mask": "dst", "total_steps": 1000}),
    ("dst s=0.9", {"sparsity": 0.9, "mask": "dst", "total_steps": 1000}),
    # the default storage, for comparison: a whole saved copy and a bool mask per partly kept tensor
    ("fisher unstructured s=0.5, storage=dense", {"sparsity": 0.5, "storage": "dense"}),
    ("fisher unstructured s=0.9, storage=dense", {"sparsity": 0.9, "storage": "dense"}),
]


# ---------------------------------------------------------------------------------------------------- helpers


def nbytes(tensors: Any) -> int:
    """``sum(numel * element_size)`` over the tensors in a dict or list (``None`` entries skipped)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values if t is not None)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def ssam_engine(model: nn.Module, **options: Any) -> SAMEngine:
    """SSAM with the sparse storage (the kept coordinates only: what this benchmark measures) unless ``options``
    name another."""
    return SAMEngine(model.named_parameters(), "ssam", **{"mask_every": NEVER, "storage": "sparse", **options})


def sparsity_name(s: float) -> str:
    return f"s{s:g}"


# ---------------------------------------------------------------------------------------------------- (a) timing


def loop_step(method: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """One training step of ``method`` in a plain loop (engine built, SSAM mask built, before any timing)."""
    x, y = batch
    optimizer = wl.make_optimizer(model.parameters())

    def loss() -> Tensor:
        return F.cross_entropy(model(x), y)

    if method in ("plain", "floor2"):
        return so.plain_loop_step(method, model, batch)
    if method == "sam":
        engine = SAMEngine(model.named_parameters(), "sam")
    else:
        engine = ssam_engine(model, sparsity=float(method.removeprefix("ssam_s")))
        wl.build_fisher_mask(engine, model, batch)

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        if engine.needs_second_pass():
            engine.ascend()
            optimizer.zero_grad()
            loss().backward()
            engine.descend()
        else:
            engine.plain_step()
        optimizer.step()

    return step


def run_loop(
    method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: Any
) -> timing.StepTimes:
    result = timing.time_loop(loop_step(method, wl.make_model(spec, device).train(), batch), warmup, steps, device)
    result.values.clear()
    result.peak_mb = None  # (not reported here: see (b))
    return result


def lightning_callbacks(method: str) -> list[L.Callback]:
    if method == "lightning_plain":
        return []
    if method == "lightning_sam":
        return [SAMCallback("sam")]
    return [SAMCallback("ssam", sparsity=float(method.removeprefix("lightning_ssam_s")))]


def run_lightning(
    method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: Any
) -> timing.StepTimes:
    """As step_overhead.run_lightning, with SSAM's sparsity in the method name; timed window only."""
    total = warmup + steps
    module = wl.BenchModule(wl.make_model(spec, device))
    timer = timing.LightningTimer(timing.synchronizer(device))
    trainer = wl.make_trainer(device, total, [timer, *lightning_callbacks(method)])
    trainer.fit(module, train_dataloaders=DataLoader(wl.SameBatch(batch, total), batch_size=None))
    return timer.step_times(warmup, total, cycles=False)


def run_method(method: str, spec: wl.ModelSpec, device: torch.device, warmup: int, steps: int, batch: Any) -> Any:
    runner = run_lightning if method.startswith("lightning_") else run_loop
    return runner(method, spec, device, warmup, steps, batch)


def time_methods(
    methods: list[str], spec: wl.ModelSpec, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    batch = wl.make_batch(spec, device)
    runs = timing.interleave(
        methods,
        lambda m: run_method(m, spec, device, args.warmup, args.steps, batch),
        args.repeats,
        prime=lambda m: run_method(m, spec, device, args.warmup, 1, batch),  # first-call costs, untimed
        label=spec.name,
        report=lambda last: timing.median_line(last, ("cpu",), 2),
    )
    return {m: so.summarize(r) for m, r in runs.items()}


def step_ratios(summary: dict[str, Any], clock: str) -> dict[str, float]:
    def v(m: str) -> float:
        return summary[m][clock]["ms"]

    out: dict[str, float] = {"floor2/plain": v("floor2") / v("plain"), "sam/floor2": v("sam") / v("floor2")}
    for m in summary:
        if m.startswith("ssam_"):
            out[f"{m}/floor2"] = v(m) / v("floor2")
            out[f"{m}/sam"] = v(m) / v("sam")
    if "lightning_plain" in summary:
        fair = v("lightning_plain") + v("floor2") - v("plain")
        for m in summary:
            if m.startswith("lightning_s"):
                out[f"{m}/(lightning_plain+floor2-plain)"] = v(m) / fair
            if m.startswith("lightning_ssam"):
                out[f"{m}/lightning_sam"] = v(m) / v("lightning_sam")
    return out


# ---------------------------------------------------------------------------------------------------- (b) memory


def prepared(spec: wl.ModelSpec, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A model whose gradients and optimizer state already exist (one plain step), with its batch."""
    model = wl.make_model(spec, device).train()
    optimizer = wl.make_optimizer(model.parameters())
    batch = wl.make_batch(spec, device)
    x, y = batch
    optimizer.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, optimizer, batch


def engine_step(engine: SAMEngine | None, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> None:
    """floor2 when ``engine`` is None, else one engine step (plain step when there is no mask yet)."""
    x, y = batch
    optimizer.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    if engine is None or engine.needs_second_pass():
        if engine is not None:
            engine.ascend()
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        if engine is not None:
            engine.descend()
    else:
        engine.plain_step()
    optimizer.step()


def cuda_peaks(
    spec: wl.ModelSpec, device: torch.device, variant: str | None, options: dict[str, Any]
) -> dict[str, float]:
    """CUDA bytes: persistent extra after setup + one step, peak of a step, peak of the mask build (MiB)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    model, optimizer, batch = prepared(spec, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine = None
    if variant == "sam":
        engine = SAMEngine(model.named_parameters(), "sam")
    elif variant == "ssam":
        engine = ssam_engine(model, **options)
        if engine.samples_needed():
            wl.build_fisher_mask(engine, model, batch)
    torch.cuda.synchronize(device)
    build_peak = torch.cuda.max_memory_allocated(device) - base
    engine_step(engine, model, optimizer, batch)  # allocates SAM's saved copy on its first ascent
    torch.cuda.synchronize(device)
    persistent = torch.cuda.memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    engine_step(engine, model, optimizer, batch)
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - base
    mib = 2**20
    return {"persistent_mib": persistent / mib, "step_peak_mib": step_peak / mib, "build_peak_mib": build_peak / mib}


def memory_table(spec: wl.ModelSpec, device: torch.device) -> dict[str, Any]:
    model, optimizer, batch = prepared(spec, device)
    sam_bytes = param_bytes(model)
    total = sum(p.numel() for p in model.parameters())
    rows: dict[str, Any] = {}
    for label, options in MEMORY_CONFIGS:
        model, optimizer, batch = prepared(spec, device)
        engine = ssam_engine(model, **options)
        if engine.samples_needed():
            wl.build_fisher_mask(engine, model, batch)
        engine_step(engine, model, optimizer, batch)
        v = engine.variant
        saved = nbytes(v._saved) + nbytes(engine._saved_views or [])
        if engine._can_swap:  # dense storage, as SAM: w + e lives in the pass-1 gradients' memory through pass 2
            saved += sam_bytes
        index, scratch = nbytes(v._device_index), nbytes(v._scratch)
        index += nbytes(v._dense_masks)  # dense storage: its bool masks stand in for the indices
        host = nbytes([k for k in v._kept if k is not None]) if v._kept is not None else 0
        extra = saved + index + scratch
        rows[label] = {
            "density": v.kept_count() / total,
            "saved_bytes": saved,
            "index_bytes": index,
            "scratch_bytes": scratch,
            "extra_bytes": extra,
            "ratio_vs_sam": extra / sam_bytes,
            "host_kept_int64_bytes": host,
            "ratio_vs_sam_incl_host_kept": (extra + host) / sam_bytes,
        }
    # the Fisher partial sums held between the steps of a refresh (batch < num_samples): measure one
    model, optimizer, batch = prepared(spec, device)
    engine = ssam_engine(model, sparsity=0.5, num_samples=10**6)  # never completes: sums stay
    x, y = batch
    engine.collect_samples(lambda i, j: F.cross_entropy(model(x[i:j]), y[i:j]), 2)
    fisher = nbytes(engine.variant._fisher)
    return {"params": total, "sam_bytes": sam_bytes, "rows": rows, "fisher_partial_bytes": fisher}


# ---------------------------------------------------------------------------------------------------- (c) refresh


def timed_method(obj: Any, attr: str, sync: Callable[[], None], into: list[tuple[float, float]]) -> None:
    """Wrap ``obj.attr`` (an instance's bound method) to append (wall s, CPU s) of each call to ``into``."""
    timing.wrap_timed(obj, attr, lambda wall, cpu, args: into.append((wall, cpu)), sync)


def fisher_refresh(spec: wl.ModelSpec, device: torch.device, batch_size: int, repeats: int) -> dict[str, Any]:
    """Time of building one Fisher mask from 128 samples (collect + select), and of the selection alone."""
    sync = timing.synchronizer(device)
    total: list[tuple[float, float]] = []
    selection: list[tuple[float, float]] = []
    calls = 0
    for _ in range(repeats + 1):  # the first is a warm-up
        model, _, batch = prepared(spec, device)
        engine = ssam_engine(model, sparsity=0.5, num_samples=FISHER_SAMPLES, fisher_batch_size=batch_size)
        selected: list[tuple[float, float]] = []
        timed_method(engine.variant, "_refresh_from_scores", sync, selected)  # the top-k and the index buffers
        sync()
        w0, c0 = timing.clocks()
        calls = wl.build_fisher_mask(engine, model, batch)
        sync()
        w1, c1 = timing.clocks()
        total.append((w1 - w0, c1 - c0))
        selection.append((sum(w for w, _ in selected), sum(c for _, c in selected)))
    total, selection = total[1:], selection[1:]
    return {
        "fisher_batch_size": batch_size,
        "collect_calls": calls,
        "wall_ms": statistics.median(w for w, _ in total) * 1e3,
        "cpu_ms": statistics.median(c for _, c in total) * 1e3,
        "selection_wall_ms": statistics.median(w for w, _ in selection) * 1e3,
        "selection_cpu_ms": statistics.median(c for _, c in selection) * 1e3,
    }


def dst_refresh(spec: wl.ModelSpec, device: torch.device, sparsity: float, refreshes: int) -> dict[str, Any]:
    """Time of one DST refresh (drop, regrow, index buffers), median over ``refreshes`` (after one warm-up)."""
    model, optimizer, batch = prepared(spec, device)
    every = 3
    engine = ssam_engine(model, mask="dst", sparsity=sparsity, total_steps=1000, mask_every=every)
    times: list[tuple[float, float]] = []
    timed_method(engine.variant, "_refresh_dst", timing.synchronizer(device), times)
    while len(times) < refreshes + 1:
        engine_step(engine, model, optimizer, batch)
    times = times[1:]
    return {
        "sparsity": sparsity,
        "wall_ms": statistics.median(w for w, _ in times) * 1e3,
        "cpu_ms": statistics.median(c for _, c in times) * 1e3,
        "refreshes": len(times),
    }


# ---------------------------------------------------------------------------------------------------- main


def mib(b: float) -> str:
    return f"{b / 2**20:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing.add_common_args(parser, MODELS)
    parser.add_argument("--sparsities", default="0.5,0.9", help="SSAM sparsities of the timed rows (0.5,0.9)")
    parser.add_argument("--lightning", action="store_true", help="also time the rows through Trainer.fit")
    args = parser.parse_args(argv)

    timing.quiet()
    device = timing.setup(args.threads, args.device, cudnn_benchmark=False)
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    methods = ["plain", "floor2", "sam", *(f"ssam_{sparsity_name(s)}" for s in sparsities)]
    if args.lightning:
        methods += ["lightning_plain", "lightning_sam", *(f"lightning_ssam_{sparsity_name(s)}" for s in sparsities)]
    env = timing.environment(device, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    timing.print_env(env)
    clocks_shown = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        spec = MODELS[name]
        entry: dict[str, Any] = {"description": spec.description}
        # (b) first: cheap, and independent of the machine's load
        entry["memory"] = memory_table(spec, device)
        if device.type == "cuda":
            cuda = {"floor2": cuda_peaks(spec, device, None, {}), "sam": cuda_peaks(spec, device, "sam", {})}
            for label, options in MEMORY_CONFIGS:
                cuda[label] = cuda_peaks(spec, device, "ssam", options)
            entry["cuda_memory"] = cuda
        # (a)
        summary = time_methods(methods, spec, device, args)
        entry["step_ms"] = summary
        entry["step_ratios"] = {c: step_ratios(summary, c) for c in clocks_shown}
        # (c)
        plain_ms = summary["plain"]["cpu" if device.type == "cpu" else "wall"]["ms"]
        ssam_ms = summary[f"ssam_{sparsity_name(sparsities[0])}"]["cpu" if device.type == "cpu" else "wall"]["ms"]
        fisher = [fisher_refresh(spec, device, b, args.repeats) for b in (1, 8)]
        for row in fisher:
            cost = row["cpu_ms"] if device.type == "cpu" else row["wall_ms"]
            row["vs_plain_step"] = cost / plain_ms
            row["amortized_per_step_at_100"] = cost / (AMORTIZE_OVER * ssam_ms)
        dst = [dst_refresh(spec, device, s, max(3, args.repeats)) for s in sparsities]
        for row in dst:
            row["vs_plain_step"] = (row["cpu_ms"] if device.type == "cpu" else row["wall_ms"]) / plain_ms
        entry["fisher_refresh"] = fisher
        entry["dst_refresh"] = dst
        entry["plain_ms"] = plain_ms
        results[name] = entry
    elapsed = time.perf_counter() - started
    print_report(results, methods, clocks_shown, device)
    return timing.finish(env, elapsed, results, args.json)


def print_report(results: dict[str, Any], methods: list[str], clocks_shown: list[str], device: torch.device) -> None:
    models = list(results)
    print("\n(a) ms/step: median of the per-run medians (min..max); cpu = process CPU time\n")
    header = ["method"] + [f"{x} {c}" for x in models for c in clocks_shown]
    rows = [
        [m] + [timing.fmt_spread(results[x]["step_ms"][m][c]) for x in models for c in clocks_shown] for m in methods
    ]
    print(timing.md_table(header, rows))
    print("\nratios of the median step times (" + " / ".join(clocks_shown) + ")\n")
    names = list(results[models[0]]["step_ratios"][clocks_shown[0]])
    rows = [
        [n] + [" / ".join(f"{results[x]['step_ratios'][c][n]:.2f}" for c in clocks_shown) for x in models]
        for n in names
    ]
    print(timing.md_table(["ratio", *models], rows))

    for x in models:
        mem = results[x]["memory"]
        print(
            f"\n(b) extra memory, {x}: {mem['params']} parameters; SAM's copy {mib(mem['sam_bytes'])} MiB; "
            f"MiB unless stated\n"
        )
        header = ["SSAM mask", "density", "saved", "indices", "scratch", "extra", "extra / SAM", "+ host int64 / SAM"]
        rows = [
            [
                label,
                f"{r['density']:.4f}",
                mib(r["saved_bytes"]),
                mib(r["index_bytes"]),
                mib(r["scratch_bytes"]),
                mib(r["extra_bytes"]),
                f"**{r['ratio_vs_sam']:.3f}**",
                f"{r['ratio_vs_sam_incl_host_kept']:.3f}",
            ]
            for label, r in mem["rows"].items()
        ]
        print(timing.md_table(header, rows))
        print(
            f"\nwhile a Fisher refresh spans several steps: + fp32 partial sums {mib(mem['fisher_partial_bytes'])} MiB "
            f"({mem['fisher_partial_bytes'] / mem['sam_bytes']:.2f} x SAM's copy)"
        )
        if "cuda_memory" in results[x]:
            cuda = results[x]["cuda_memory"]
            print(f"\nCUDA, {x}: MiB over params + grads + momentum (memory_allocated / max_memory_allocated)\n")
            rows = [
                [k, f"{v['persistent_mib']:.3f}", f"{v['step_peak_mib']:.3f}", f"{v['build_peak_mib']:.3f}"]
                for k, v in cuda.items()
            ]
            print(timing.md_table(["method", "persistent extra", "step peak", "mask build peak"], rows))

    clock = "cpu" if device.type == "cpu" else "wall"
    print(f"\n(c) refresh cost ({clock} ms; 'x plain' = multiples of one plain step)\n")
    rows = []
    for x in models:
        r = results[x]
        for f in r["fisher_refresh"]:
            rows.append(
                [
                    f"{x}: Fisher, 128 samples, fisher_batch_size {f['fisher_batch_size']} "
                    f"({f['collect_calls']} call(s))",
                    f"{f[clock + '_ms']:.1f}",
                    f"{f['vs_plain_step']:.1f}",
                    f"{f['selection_' + clock + '_ms']:.1f}",
                    f"{100 * f['amortized_per_step_at_100']:.1f} %",
                ]
            )
        for d in r["dst_refresh"]:
            rows.append(
                [
                    f"{x}: DST refresh, s={d['sparsity']:g}",
                    f"{d[clock + '_ms']:.1f}",
                    f"{d['vs_plain_step']:.2f}",
                    "",
                    "",
                ]
            )
    header = ["refresh", "ms", "x plain step", "of it: mask selection ms", "amortized over 100 SSAM steps"]
    print(timing.md_table(header, rows))


if __name__ == "__main__":
    main()
