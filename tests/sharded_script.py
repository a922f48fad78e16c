"""SAM under Lightning's ModelParallelStrategy on 2 CPU processes (gloo): FSDP2 (``fully_shard``) or tensor parallel.

Run by tests/test_sharded.py as ``python sharded_script.py <layout> <out_dir> <case> [<case> ...]``; ``layout`` is
``fsdp`` (data_parallel_size=2) or ``tp`` (tensor_parallel_size=2, both ranks see the same batch). Each case is one
``Trainer.fit`` (the same processes run them one after the other); rank 0 writes ``<out_dir>/<layout>.pt`` with each
case's full weights and logged metrics. The cases and the data are defined in :mod:`sharded_cases`, which the test
also uses for the one-process reference runs on the union of the ranks' batches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from script_exit import finish
from sharded_cases import CASES, fit

torch.set_num_threads(1)


def main(layout: str, out: Path, cases: list[str]) -> None:
    results = {}
    rank = 0
    for case in cases:
        if case.startswith("refuse_"):  # must stop before training, with this message
            try:
                fit(CASES[case], layout, out / case)
            except (ValueError, RuntimeError) as error:
                results[case] = {"error": str(error)}
            continue
        weights, metrics, rank = fit(CASES[case], layout, out / case)
        results[case] = {"weights": weights, "metrics": metrics}
    if rank == 0:
        torch.save(results, out / f"{layout}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
    finish()  # destroy the process group, exit without finalization (see script_exit)
