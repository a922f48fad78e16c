"""BAR under Lightning's ModelParallelStrategy on 2 CPU ranks (gloo), on peft LoRA factors of a tiny BERT: FSDP2
(every factor split over the ranks) and tensor parallel (the first block's LoRA split, every other pair a plain tensor
both ranks hold) equal the same run in one process on the union of the data-parallel ranks' batches, weights and
logged balancedness (the model, the data and the layouts: tests/sharded_bar_script.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

pytest.importorskip("peft")
pytest.importorskip("transformers")

from sharded_bar_script import CASES, fit

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_bar_script.py")
pytestmark = pytest.mark.slow

TOLERANCE = 1e-5  # fp32: the sharded run sums the same products in another order (reduce-scatter, shard norms)
HOLDERS = {"fsdp": [1], "tp": [1, 2]}  # tp: the split pairs (1 holder) and the plain ones both ranks hold


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_bar")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, SCRIPT, str(out), *CASES], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out, torch.load(out / "results.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_bar_equals_one_process_on_the_union_batch(sharded, name):
    out, results = sharded
    case = CASES[name]
    expected, logged, _ = fit(case, f"single-{case.layout}", out / f"single-{name}")
    got, metrics = results[name]["weights"], results[name]["metrics"]
    assert metrics["holders"] == HOLDERS[case.layout]
    assert sorted(got) == sorted(expected)
    for param, weight in expected.items():
        difference = (got[param] - weight).abs().max().item()
        assert difference <= TOLERANCE, f"{name} {param}: {difference:.3g} > {TOLERANCE:.3g}"
    # the logged balancedness is global: that of the one process on the union batch (a difference of squared norms
    # of up to ~50: fp32 rounding of those, a few 1e-6, is the tolerance; shard-local norms miss by > 0.1)
    balancedness = [key for key in metrics if key.startswith("sam/balancedness")]
    assert sorted(balancedness) == ["sam/balancedness_max_step", "sam/balancedness_mean_step"]
    for key in balancedness:
        assert metrics[key] == pytest.approx(logged[key], rel=1e-5, abs=5e-5), f"{name} {key}"
    # BAR's effect is far above the tolerance: a sharded run that skipped it would fail the check above
    plain, _, _ = fit(replace(case, bar=False), f"single-{case.layout}", out / f"plain-{name}")
    gap = max((plain[param] - weight).abs().max().item() for param, weight in expected.items())
    assert gap > 5 * TOLERANCE, f"{name}: BAR changed the weights by {gap:.3g} only"
