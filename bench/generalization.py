"""Test accuracy of SGD, SAM, the cheap path and every variant on the demo task, over label-noise levels and seeds.

The task, model and training are those of ``examples/digits_label_noise.py`` (imported from it, through its
``train_method`` hook): scikit-learn's digits (1,257 training images, 540 clean test images, a stratified split
seeded by the seed), a fraction ``noise`` of the training labels flipped to a random other class (seeded by the
seed), an MLP 64-256-256-10, SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4, batch 64) with a cosine
schedule over the epochs, ``deterministic=True``. The seed also fixes the initialization and the batch order, so
for one (noise, seed) every method starts from the same weights and sees the same batches: the only difference
between the runs is the SAMCallback in the Trainer.

=================  ==========================================================================================
sgd                no callback
sam                ``SAMCallback("sam", rho=0.05)``
sam_interval5      ``SAMCallback("sam", rho=0.05, interval=5)``: a SAM step every 5th step
looksam            ``SAMCallback("looksam", rho=0.05)``: k=5, alpha=0.7
asam               ``SAMCallback("asam", rho=0.5)``
ssam               ``SAMCallback("ssam", rho=0.05, sparsity=0.5)``: Fisher mask, refreshed every epoch
fsam               ``SAMCallback("fsam", rho=0.05)``
xsam               ``SAMCallback("xsam", rho=0.15)``: alpha searched on the first batch of each epoch
sam_rho<r>         ``SAMCallback("sam", rho=r)`` for r = 0.15, 0.2, 0.5: extra rows, since the demo's rho=0.05 is
                   SAM's usual default, not tuned for this model; 0.15 is XSAM's default radius (like for like)
=================  ==========================================================================================

Optional rows (``--methods``): ``looksam_alpha0``, ``looksam_alpha0.1``, ``looksam_alpha0.3``: LookSAM with a
smaller weight on the reused component (``alpha=0`` is ``sam_interval5`` exactly).

Apart from the ``sam_rho<r>`` rows the radii are each variant's usual default (the demo's), not tuned. BAR is not
in the table: it acts on LoRA-style factor pairs (``pairs=``), and this MLP has none.

Reported: per method and noise level, the mean ± sample standard deviation over the seeds of the **final** test
accuracy (after the last epoch: the honest number), the same for the paired difference to SGD (same seed, so same
split, noise, init and batches; with wins/ties/losses), and the **best-epoch** test accuracy, which is the maximum
over epochs on the test set itself, an oracle early-stopping number that is optimistic by construction and shown
only because label noise makes the final and best numbers differ a lot. One test image is 0.185 % of the test set.

Usage::

    python bench/generalization.py                       # 11 methods x noise 0,0.2,0.4 x seeds 0,1,2, 40 epochs
    python bench/generalization.py --quick               # smoke run: 2 epochs, 3 methods, one noise, one seed
    python bench/generalization.py --jobs 2 --json generalization.json
    python bench/generalization.py --methods sgd,sam,sam_rho0.2 --noises 0.35 --seeds 0,1,2,3,4 --epochs 60
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

DEMO_PATH = Path(__file__).resolve().parent.parent / "examples" / "digits_label_noise.py"
# method -> (the demo's method, overrides of the demo's options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "sam_interval5": ("sam_interval5", {}),
    "looksam": ("looksam", {}),
    "asam": ("asam", {}),
    "ssam": ("ssam", {}),
    "fsam": ("fsam", {}),
    "xsam": ("xsam", {}),
    "sam_rho0.15": ("sam", {"rho": 0.15}),
    "sam_rho0.2": ("sam", {"rho": 0.2}),
    "sam_rho0.5": ("sam", {"rho": 0.5}),
    # optional rows (--methods): LookSAM with a smaller weight on the reused g_v; alpha=0 is sam_interval5 exactly
    "looksam_alpha0": ("looksam", {"looksam_alpha": 0.0}),
    "looksam_alpha0.1": ("looksam", {"looksam_alpha": 0.1}),
    "looksam_alpha0.3": ("looksam", {"looksam_alpha": 0.3}),
}
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("looksam_alpha")]
QUICK_METHODS = ("sgd", "sam", "looksam")

_demo: ModuleType | None = None


def demo() -> ModuleType:
    """examples/digits_label_noise.py as a module (examples/ is not a package), loaded once per process."""
    global _demo
    if _demo is None:
        spec = importlib.util.spec_from_file_location("digits_label_noise", DEMO_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
        spec.loader.exec_module(module)
        _demo = module
    return _demo


def init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    demo()


def run_one(task: tuple[str, float, int, int]) -> dict[str, Any]:
    """Train one (method, noise, seed) run; a plain dict comes back (picklable across processes)."""
    method, noise, seed, epochs = task
    demo_method, overrides = METHODS[method]
    cpu0 = time.process_time()
    r = demo().train_method(demo_method, noise=noise, seed=seed, epochs=epochs, **overrides)
    return {
        "method": method,
        "label": r.label,
        "noise": noise,
        "seed": seed,
        "final": r.final,
        "best": r.best,
        "best_epoch": r.best_epoch,
        "train_acc_noisy": r.train_acc_noisy,
        "memorized": r.memorized,
        "seconds": r.seconds,
        "cpu_seconds": time.process_time() - cpu0,
        "test_acc": r.test_acc,
    }


# ---------------------------------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pct(values: list[float], signed: bool = False) -> str:
    m, s = mean_std([100 * v for v in values])
    head = f"{m:+.1f}" if signed else f"{m:.1f}"
    return head if s != s else f"{head} ± {s:.1f}"  # s != s: NaN (one seed)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tables(runs: list[dict[str, Any]], methods: list[str], noises: list[float], seeds: list[int]) -> str:
    by = {(r["method"], r["noise"], r["seed"]): r for r in runs}

    def values(method: str, noise: float, key: str) -> list[float]:
        return [by[method, noise, s][key] for s in seeds]

    noise_cols = [f"noise {n:g}" for n in noises]
    out = [f"Final test accuracy (%), mean ± std over seeds {seeds}:\n"]
    out.append(md_table(["method", *noise_cols], [[m] + [pct(values(m, n, "final")) for n in noises] for m in methods]))
    if "sgd" in methods:
        out.append(
            "\nFinal test accuracy minus SGD's, paired by seed (percentage points), mean ± std [wins/ties/losses]:\n"
        )
        rows = []
        for m in (m for m in methods if m != "sgd"):
            cells = []
            for n in noises:
                diffs = [a - b for a, b in zip(values(m, n, "final"), values("sgd", n, "final"))]
                wins, losses = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
                cells.append(f"{pct(diffs, signed=True)} [{wins}/{len(diffs) - wins - losses}/{losses}]")
            rows.append([m, *cells])
        out.append(md_table(["method", *noise_cols], rows))
    out.append("\nBest-epoch test accuracy (%), the maximum over epochs ON THE TEST SET (an optimistic oracle):\n")
    out.append(md_table(["method", *noise_cols], [[m] + [pct(values(m, n, "best")) for n in noises] for m in methods]))
    noisy = [n for n in noises if n > 0]
    header = ["method"] + [f"memorized, noise {n:g}" for n in noisy] + ["s/run (wall)", "CPU s/run"]
    rows = []
    for m in methods:
        cells = [pct(values(m, n, "memorized")) for n in noisy]
        mine = [r for r in runs if r["method"] == m]
        cells += [f"{statistics.fmean(r['seconds'] for r in mine):.1f}"]
        cells += [f"{statistics.fmean(r['cpu_seconds'] for r in mine):.1f}"]
        rows.append([m, *cells])
    out.append(
        "\nFlipped training labels the final model predicts as their wrong label (%, mean ± std), and the mean time "
        "per run (Trainer.fit only; CPU time of the worker process):\n"
    )
    out.append(md_table(header, rows))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", help="comma-separated subset of: " + ",".join(METHODS) + " (default: all but looksam_alpha*)"
    )
    parser.add_argument("--noises", help="label-noise levels (default 0.0,0.2,0.4)")
    parser.add_argument("--seeds", help="seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per run (default 40; the demo's is 30)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 epochs; unless given: sgd,sam,looksam, noise 0.2, seed 0"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run (per-epoch test accuracy) as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    defaults = (
        (",".join(QUICK_METHODS), "0.2", "0") if args.quick else (",".join(DEFAULT_METHODS), "0.0,0.2,0.4", "0,1,2")
    )
    args.methods, args.noises, args.seeds = (
        given or default for given, default in zip((args.methods, args.noises, args.seeds), defaults)
    )
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    noises = [float(n) for n in args.noises.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.epochs < 1 or args.jobs < 1:
        parser.error("--epochs and --jobs must be >= 1")

    tasks = [(m, n, s, args.epochs) for n in noises for s in seeds for m in methods]
    print(
        f"{len(methods)} methods x {len(noises)} noise levels x {len(seeds)} seeds = {len(tasks)} runs of "
        f"{args.epochs} epochs, {args.jobs} process(es)",
        flush=True,
    )
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []

    def report(r: dict[str, Any]) -> None:
        runs.append(r)
        print(
            f"[{len(runs)}/{len(tasks)} {time.perf_counter() - started:5.0f} s] noise {r['noise']:g} seed {r['seed']} "
            f"{r['method']}: final {r['final']:.4f}, best {r['best']:.4f} (epoch {r['best_epoch']}), "
            f"{r['seconds']:.1f} s",
            flush=True,
        )

    if args.jobs == 1:
        init_worker(1)
        for task in tasks:
            report(run_one(task))
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=init_worker, initargs=(1,)) as pool:
            for future in cf.as_completed([pool.submit(run_one, t) for t in tasks]):
                report(future.result())
    elapsed = time.perf_counter() - started

    import lightning
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "epochs": args.epochs,
        "jobs": args.jobs,
    }
    print(f"\n{len(tasks)} runs in {elapsed:.0f} s; " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n")
    text = tables(runs, methods, noises, seeds)
    print(text)
    out = {"env": env, "elapsed_s": elapsed, "methods": methods, "noises": noises, "seeds": seeds, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
