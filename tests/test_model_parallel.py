"""Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes, without SAM: the ground sharded SAM will stand on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "model_parallel_script.py")
pytestmark = pytest.mark.slow


def run(mode: str, out_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, SCRIPT, mode, str(out_dir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(out_dir / f"{mode}.pt", weights_only=False)


def test_lightnings_own_resume_from_an_epoch_checkpoint_is_exact(tmp_path):
    """Plain SGD with momentum, FSDP2 over 2 ranks, a ModelCheckpoint at every epoch end: resuming from the epoch-1
    checkpoint ends bit-identical to the uninterrupted run (momentum and the shuffled sampler's epoch restored)."""
    straight = run("straight", tmp_path)
    resumed = run("resume", tmp_path)
    assert straight["global_step"] == resumed["global_step"] == 12
    for name, weight in straight["weights"].items():
        assert torch.equal(weight, resumed["weights"][name]), name
