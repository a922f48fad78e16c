"""SAMEngine in a Lightning Fabric loop under ModelParallelStrategy (FSDP2 ``fully_shard``, 2 CPU ranks, gloo):
each variant's run (tests/fabric_sharded_script.py) equals a plain single-process PyTorch loop with ``SAMEngine`` on
the union of the two ranks' batches (batch ``i`` = rank 0's batch ``i``, then rank 1's: 16 samples).

FSDP2 reduce-scatters the mean of the ranks' gradients, and the ranks' batches are of equal size, so every pass's
gradient shard is the gradient of the 16-sample union batch; norms and inner products are reduced over the shards.
XSAM's alpha search probes the loss forward-only through FSDP2 (the engine reshards after each probe) and sums the
ranks' probe losses: the argmax is the union batch's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))

from fabric_sharded_script import EPOCHS, UNION_OPTIONS, VARIANTS
from sharded_cases import build_net, loader

from lightning_sam import SAMEngine

SCRIPT = os.path.join(os.path.dirname(__file__), "fabric_sharded_script.py")
TOLERANCE = 1e-5  # fp32: the sharded run sums the same products in another order (reduce-scatter, shard norms)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fabric_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every variant under Fabric + FSDP2 on 2 processes (one launch; a fresh model per variant)."""
    out = tmp_path_factory.mktemp("fabric_sharded")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, SCRIPT, str(out), *VARIANTS], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(Path(out) / "fabric_sharded.pt", weights_only=False)


def single_process(variant: str | None) -> tuple[dict[str, Tensor], SAMEngine | None]:
    """The reference: the same net, optimizer and epochs in one process on the union batches, no Fabric, no
    distributed; ``variant=None``: plain SGD steps (no SAM)."""
    net = build_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    options = {} if variant is None else {**VARIANTS[variant], **UNION_OPTIONS.get(variant, {})}
    engine = None if variant is None else SAMEngine.from_optimizer(optimizer, net, variant, **options)
    for _ in range(EPOCHS):
        for x, y in loader("single-fsdp", 0):

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            if engine is None:
                closure()
                optimizer.step()
            else:
                if engine.samples_needed():
                    engine.collect_samples(lambda i, j, x=x, y=y: F.cross_entropy(net(x[i:j]), y[i:j]), len(x))
                engine.step(closure, optimizer, probe=lambda x=x, y=y: F.cross_entropy(net(x), y))
    return {name: p.detach().clone() for name, p in net.named_parameters()}, engine


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fabric_fsdp2_run_equals_one_process_on_the_union_batch(
    fabric_runs: dict[str, dict[str, Any]], variant: str
) -> None:
    run = fabric_runs[variant]
    expected, engine = single_process(variant)
    assert engine is not None
    assert run["steps"] == engine.step_count == 4 * EPOCHS  # 4 batches of 8 per epoch on each rank
    assert "no_sync cannot be used with sharded parameters" in run["no_sync_refused"]
    assert run["state_round_trip"], "save_rank_state / load_rank_state did not give this rank's engine state back"
    difference = max_difference(run["weights"], expected)
    print(f"{variant}: max |fabric - single| = {difference:.3g}")
    assert difference <= TOLERANCE, f"{variant}: {difference:.3g} > {TOLERANCE:.3g}"
    if variant == "xsam":  # the same searches, and the same alpha picked from the ranks' summed probe losses
        assert run["variant_state"] == engine.variant.state_dict()
        assert run["variant_state"]["searches"] == 3  # steps 0, 3, 6
    # the variant's effect is far above the tolerance: a run that skipped SAM (plain steps) would fail the check
    plain, _ = single_process(None)
    assert max_difference(plain, expected) > 100 * TOLERANCE
    # each rank held its own shard only: the parameters and SAM's saved copy split between the ranks
    total = sum(w.numel() for w in expected.values())
    held = run["held_per_rank"]
    assert sum(elements for elements, _ in held) == total
    if variant == "ssam":  # SSAM saves its kept coordinates only, in its own buffers
        assert run["variant_state"]["kept"].keys() == engine.variant.state_dict()["kept"].keys()
    else:
        assert all(elements == saved < total for elements, saved in held)
