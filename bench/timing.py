"""Shared timing helpers of the bench/ scripts (a helper module, not a benchmark).

What every timing script here does the same way:

* **Setup**: :func:`add_common_args` / :func:`add_methods_arg` / :func:`selected` (the shared command-line
  options), :func:`quiet` (Lightning's info logs and known warnings off), :func:`setup` (torch threads, the device,
  cuDNN autotuning on CUDA), :func:`keep_freed_memory` (no page faults from glibc's trimming), :func:`environment`
  / :func:`print_env` (the versions and settings line).
* **Clocks**: every reading is a pair (wall ``perf_counter``, process CPU ``process_time``), :func:`clocks`. With
  one torch thread on a CPU the process CPU time is the work itself and leaves out the time the process waits for a
  core, so it is the clock to trust on a shared machine (it still grows when other jobs compete for caches and
  memory bandwidth: compare methods interleaved, never across runs); on CUDA only wall time means anything (after a
  :func:`synchronizer` call). :func:`reset_peak` / :func:`read_peak`: CUDA peak memory, ``None`` elsewhere.
* **Step times**: :class:`StepTimes` (per-step wall and CPU times of one run, the Lightning cycle when there is
  one, what the steps returned, the peak memory), filled by :func:`time_loop` (a plain PyTorch loop) or by
  :class:`LightningTimer` (a Lightning callback, put first in the callback list, that reads the clocks at batch
  and epoch boundaries).
* **Interleaving**: :func:`interleave` runs every method once per repeat, in order, after an untimed priming
  pass, and prints one progress line per repeat (e.g. :func:`median_line`); a slow phase of the machine then hits
  every method alike.
* **Statistics**: :func:`spread` (median, min, max of run values, in ms), :func:`median_of_medians`,
  :func:`cycle_means` (mean step over consecutive ``k``-step cycles, for methods whose steps alternate).
* **Tables**: :func:`md_table`, :func:`fmt_spread`, :func:`ratio_rows`; :func:`finish` prints the total time
  and writes the ``--json`` file; :func:`print_profile` prints a cProfile.
* **Method timers**: :func:`wrap_timed` times every call of a function or method (the phase breakdowns).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import logging
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback

Reading = tuple[float, float]  # (wall s, process CPU s)
CLOCKS = ("wall", "cpu")

# ---------------------------------------------------------------------------------------------------- setup


def quiet() -> None:
    """Lightning's info logs and the warnings every benchmark Trainer triggers (not ours) off."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*max_epochs.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10, not ours


def setup(threads: int, device: str, cudnn_benchmark: bool = True) -> torch.device:
    """``torch.set_num_threads(threads)`` and the device (exits when CUDA is asked for but missing).

    One thread is the default of every script: on the shared 2-core reference machine two intra-op threads made
    every step hostage to any other process (OpenMP barriers stall when one of the cores is busy).
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available")
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
    return dev


def add_common_args(
    parser: argparse.ArgumentParser,
    models: Iterable[str],
    default_models: str = "cnn,mlp",
    steps: int | None = 30,
    warmup: int | None = 5,
    repeats: int = 5,
) -> None:
    """The options every timing script shares: --steps, --warmup (``None``: the script has its own), --repeats,
    --device, --models, --threads and --json."""
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help=f"timed steps per run (default {steps})")
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps before each run ({warmup})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"runs per method, interleaved ({repeats})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--models", default=default_models, help="comma-separated subset of: " + ",".join(models))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see timing.setup)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def add_methods_arg(
    parser: argparse.ArgumentParser, known: Sequence[str], default: Sequence[str], note: str = ""
) -> None:
    """``--methods``: a comma-separated subset of ``known`` or 'all' (read it with :func:`selected`)."""
    optional = [m for m in known if m not in default]
    parser.add_argument(
        "--methods",
        default=",".join(default),
        help="comma-separated subset of: "
        + ",".join(known)
        + "; or 'all'"
        + (f" (default: all but {','.join(optional)}{note})" if optional else f" (default){note}"),
    )


def selected(value: str, known: Sequence[str], what: str = "methods") -> list[str]:
    """The names of a comma-separated option ('all': every known one); exits on an unknown name."""
    names = list(known) if value == "all" else [m for m in value.split(",") if m]
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"unknown {what} {unknown}; known: {list(known)}")
    return names


def keep_freed_memory() -> bool:
    """glibc: keep freed heap memory mapped (no trimming; no private mmap for blocks under 32 MiB). Returns whether
    it applied (not on other C libraries).

    By default glibc hands large freed blocks back to the kernel, so the next step's activations of the same size
    are page-faulted in again, zeroed: on the reference VM a CNN step's process CPU time then varied by up to 45 %
    from one fit to the next (0-300k minor faults per fit) whatever the method. Kept mapped, the same memory is reused
    every step. Call it once, before the timed work.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def environment(device: torch.device, **settings: Any) -> dict[str, Any]:
    """Versions, machine and the run's settings (printed first, stored in the JSON)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": device_name(device),
        **settings,
    }


def print_env(env: dict[str, Any]) -> None:
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))


# ---------------------------------------------------------------------------------------------------- clocks


def clocks() -> Reading:
    """(wall, process CPU) time in seconds."""
    return time.perf_counter(), time.process_time()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A call that waits for the device's queued work (a no-op off CUDA): call it before each clock reading."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last :func:`reset_peak`; ``None`` off CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# ---------------------------------------------------------------------------------------------------- step times


@dataclass
class StepTimes:
    """Per-step times of one run, in seconds: wall clock and process CPU time.

    ``cycle_*``: Lightning only, ``on_train_batch_start`` to the next one (adds the data fetch and Lightning's
    end-of-batch bookkeeping to the step). ``values``: what each timed step returned, or a probe taken before it.
    """

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    cycle_wall_s: list[float] = field(default_factory=list)
    cycle_cpu_s: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    values: list[Any] = field(default_factory=list)

    def add(self, start: Reading, end: Reading) -> None:
        self.wall_s.append(end[0] - start[0])
        self.cpu_s.append(end[1] - start[1])

    def add_cycle(self, start: Reading, end: Reading) -> None:
        self.cycle_wall_s.append(end[0] - start[0])
        self.cycle_cpu_s.append(end[1] - start[1])

    def get(self, clock: str, cycle: bool = False) -> list[float]:
        """The times of ``clock`` ("wall" or "cpu"), of the cycles when ``cycle``."""
        return getattr(self, f"{'cycle_' if cycle else ''}{clock}_s")


def time_loop(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> StepTimes:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones (synchronized on CUDA); records what they
    return and the peak CUDA memory of the whole loop."""
    sync = synchronizer(device)
    reset_peak(device)
    for _ in range(warmup):
        step()
    sync()
    out = StepTimes()
    for _ in range(steps):
        start = clocks()
        value = step()
        sync()
        out.add(start, clocks())
        out.values.append(value)
    out.peak_mb = read_peak(device)
    return out


class LightningTimer(Callback):
    """Clock readings at Lightning's batch and epoch boundaries (put it first in the callback list).

    ``starts`` / ``ends``: readings at ``on_train_batch_start`` / ``on_train_batch_end``; ``batches``: the
    (epoch, batch_idx) of each; ``epochs``: (start, end) readings of each epoch; ``probes``: what ``probe()``
    returned at each batch start, asked before the clock is read and before any later callback's hook (e.g. whether
    a SAM callback's engine plans pass 2 for the step).
    """

    def __init__(self, sync: Callable[[], None] | None = None, probe: Callable[[], Any] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.probe = probe
        self.starts: list[Reading] = []
        self.ends: list[Reading] = []
        self.batches: list[tuple[int, int]] = []
        self.probes: list[Any] = []
        self.epochs: list[tuple[Reading, Reading]] = []
        self._epoch_start: Reading = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self._epoch_start = clocks()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self.epochs.append((self._epoch_start, clocks()))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.probe is not None:
            self.probes.append(self.probe())
        self.batches.append((trainer.current_epoch, idx))
        self.sync()
        self.starts.append(clocks())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.sync()
        self.ends.append(clocks())

    def step_times(self, first: int = 0, stop: int | None = None, cycles: bool = True) -> StepTimes:
        """The steps ``first..stop-1``: window times, the probes and (``cycles``) the cycle times of the steps
        after which a batch started."""
        stop = len(self.ends) if stop is None else stop
        out = StepTimes()
        for i in range(first, stop):
            out.add(self.starts[i], self.ends[i])
            if cycles and i + 1 < len(self.starts):
                out.add_cycle(self.starts[i], self.starts[i + 1])
            if self.probes:
                out.values.append(self.probes[i])
        return out


# ---------------------------------------------------------------------------------------------------- interleaving


def interleave(
    names: Sequence[Hashable],
    run: Callable[[Any], Any],
    repeats: int,
    *,
    prime: Callable[[Any], Any] | None = None,
    label: str = "",
    report: Callable[[dict[Any, Any]], str] | None = None,
) -> dict[Any, list[Any]]:
    """Run every method once per repeat, in order (``run(name)``), after one untimed ``prime(name)`` of each.

    The priming pass keeps first-call costs (oneDNN primitives, Trainer imports) out of the first method's numbers.
    After each repeat, ``report`` turns that repeat's results into the text of a progress line
    ``[<label> repeat r/R] <text>``. Returns ``{name: [result of each repeat]}``.
    """
    if prime is not None:
        for name in names:
            prime(name)
    runs: dict[Any, list[Any]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            runs[name].append(run(name))
        if report is not None:
            text = report({name: results[-1] for name, results in runs.items()})
            print(f"[{label} repeat {repeat + 1}/{repeats}] {text}", flush=True)
    return runs


def median_line(last: dict[Any, StepTimes], clocks_shown: Sequence[str] = CLOCKS, digits: int = 1) -> str:
    """A progress text for :func:`interleave`: each method's median step, e.g. ``wall/cpu ms: sam 30.1/29.8``."""
    return f"{'/'.join(clocks_shown)} ms: " + ", ".join(
        f"{name} " + "/".join(f"{statistics.median(r.get(c)) * 1e3:.{digits}f}" for c in clocks_shown)
        for name, r in last.items()
    )


# ---------------------------------------------------------------------------------------------------- statistics


def spread(values_s: Iterable[float], runs_key: str = "runs") -> dict[str, Any]:
    """Run values (s) as ``{"ms": median, "min", "max", runs_key: [values]}`` in milliseconds."""
    ms = [v * 1e3 for v in values_s]
    return {"ms": statistics.median(ms), "min": min(ms), "max": max(ms), runs_key: ms}


def median_of_medians(per_run: list[list[float]], runs_key: str = "run_medians") -> dict[str, Any] | None:
    """Each run's median step (s), summarized by :func:`spread`; ``None`` when a run has no values."""
    if not per_run or not all(per_run):
        return None
    return spread((statistics.median(run) for run in per_run), runs_key)


def cycle_means(times: list[float], k: int) -> list[float]:
    """The mean of each whole cycle of ``k`` consecutive steps (a trailing partial cycle is dropped)."""
    return [statistics.fmean(times[i : i + k]) for i in range(0, len(times) - k + 1, k)]


# ---------------------------------------------------------------------------------------------------- tables


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_spread(stats: dict[str, Any] | None, digits: int = 2) -> str:
    """``median (min..max)``, or ``-`` for a missing entry."""
    if stats is None:
        return "-"
    return f"{stats['ms']:.{digits}f} ({stats['min']:.{digits}f}..{stats['max']:.{digits}f})"


def ratio_rows(
    names: Iterable[str],
    columns: Sequence[str],
    value: Callable[[str, str, str], float],
    clocks_shown: Sequence[str],
    digits: int = 2,
) -> list[list[str]]:
    """Rows ``[name, "<clock 1> / <clock 2>" per column]`` with ``value(column, clock, name)``."""
    return [
        [name] + [" / ".join(f"{value(col, c, name):.{digits}f}" for c in clocks_shown) for col in columns]
        for name in names
    ]


def write_json(path: str, out: Any, note: str | None = "wrote {path}") -> None:
    """Write ``out`` as indented JSON; print ``note`` (``None``: nothing)."""
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    if note:
        print(note.format(path=path))


def finish(env: dict[str, Any], elapsed: float, results: Any, json_path: str | None) -> dict[str, Any]:
    """Print the total time; write ``{"env", "elapsed_s", "results"}`` to ``json_path`` if given; return it."""
    print(f"\ntotal benchmark time {elapsed:.0f} s")
    out = {"env": env, "elapsed_s": elapsed, "results": results}
    if json_path:
        write_json(json_path, out)
    return out


def print_profile(
    profiler: Any, title: str, cumulative: int = 45, tottime: int = 25, restrict: Sequence[Any] = ()
) -> None:
    """A cProfile's top functions by cumulative time, then by own time (``restrict``: pstats restrictions)."""
    print(f"--- {title} ---")
    for key, count in (("cumulative", cumulative), ("tottime", tottime)):
        if count:
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(key).print_stats(*restrict, count)
            print(stream.getvalue())


# ---------------------------------------------------------------------------------------------------- method timers


def wrap_timed(
    owner: Any,
    attr: str,
    record: Callable[[float, float, tuple[Any, ...]], None],
    sync: Callable[[], None] | None = None,
) -> Callable[[], None] | None:
    """Time every call of ``owner.attr``: ``record(wall s, cpu s, args)`` after each call (also when it raises).

    ``owner`` is a class (its own function ``owner.__dict__[attr]`` is replaced; ``None`` is returned when the
    class does not define ``attr`` itself, e.g. a private method the library renamed) or an instance (its bound
    method is shadowed by an instance attribute). Returns the call that puts the original back.
    """
    sync = sync or (lambda: None)
    if isinstance(owner, type):
        original = owner.__dict__.get(attr)
        if original is None:
            return None
    else:
        original = getattr(owner, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        sync()
        w0, c0 = clocks()
        try:
            return original(*args, **kwargs)
        finally:
            sync()
            w1, c1 = clocks()
            record(w1 - w0, c1 - c0, args)

    shadowed = not isinstance(owner, type) and attr in vars(owner)
    setattr(owner, attr, timed)

    def restore() -> None:
        if isinstance(owner, type) or shadowed:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)

    return restore
