"""2-process DDP on CPU (gloo): local pass 1, bit-identical ranks, all-reduce counts, reference equality."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_data, make_mlp, make_optimizer
from ddp_script import BATCH_SIZE, N_SAMPLES
from reference import PERTURBATIONS
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")
pytestmark = pytest.mark.slow


def run_ddp(mode: str, out_dir) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, SCRIPT, mode, str(out_dir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [torch.load(out_dir / f"{mode}_rank{rank}.pt", weights_only=False) for rank in range(2)]


def rank_batches(rank: int, world: int = 2):
    """What Lightning hands rank ``rank``, batch by batch: it always shuffles training data under DDP, with a
    DistributedSampler seeded by PL_GLOBAL_SEED (unset: 0), epoch 0."""
    data = make_data(N_SAMPLES)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    indices = list(sampler)
    return [
        (data.tensors[0][indices[i : i + BATCH_SIZE]], data.tensors[1][indices[i : i + BATCH_SIZE]])
        for i in range(0, len(indices), BATCH_SIZE)
    ]


def grads_at(net, batches, accumulate=1):
    """Gradient of the window ``batches`` (one batch or a list), each loss divided by ``accumulate``."""
    net.zero_grad()
    for x, y in batches if isinstance(batches, list) else [batches]:
        (F.cross_entropy(net(x), y) / accumulate).backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def reference_local_ascent(world: int = 2, accumulate: int = 1):
    """Each rank perturbs with its own (window) gradient; the descent gradient is the mean of the ranks' g_adv."""
    net = make_mlp()
    optimizer = make_optimizer("sgd", net.parameters())
    per_rank = [rank_batches(r, world) for r in range(world)]
    windows = [[batches[i : i + accumulate] for i in range(0, len(batches), accumulate)] for batches in per_rank]
    params = list(net.parameters())
    for step in range(len(windows[0])):
        adversarial = []
        for rank in range(world):
            batch = windows[rank][step]
            originals = [p.detach().clone() for p in params]
            perturbation = PERTURBATIONS["sam"](params, grads_at(net, batch, accumulate), 0.05)
            with torch.no_grad():
                for p, e in zip(params, perturbation):
                    p.add_(e)
            adversarial.append(grads_at(net, batch, accumulate))
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in adversarial) / world
        optimizer.step()
    return net


def reference_full_batch(world: int = 2):
    """Single-process SAM on the union of the ranks' batches."""
    net = make_mlp()
    optimizer = make_optimizer("sgd", net.parameters())
    per_rank = [rank_batches(r, world) for r in range(world)]
    params = list(net.parameters())
    for step in range(len(per_rank[0])):
        batch = (torch.cat([b[step][0] for b in per_rank]), torch.cat([b[step][1] for b in per_rank]))
        originals = [p.detach().clone() for p in params]
        perturbation = PERTURBATIONS["sam"](params, grads_at(net, batch), 0.05)
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.add_(e)
        grads = grads_at(net, batch)
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return net


def assert_ranks_identical(results):
    for key, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][key]), key


def assert_matches(weights, net):
    for name, p in net.state_dict().items():
        torch.testing.assert_close(weights[name], p, atol=1e-6, rtol=0, msg=name)


def test_local_ascent_ranks_identical_one_allreduce_per_step(tmp_path):
    results = run_ddp("local", tmp_path)
    assert_ranks_identical(results)
    assert results[0]["global_step"] == 5
    assert [r["allreduce_count"] for r in results] == [5, 5]  # pass 1 did not all-reduce
    assert_matches(results[0]["weights"], reference_local_ascent())


@pytest.mark.parametrize("mode", ["local_unused", "local_spawn"])
def test_find_unused_parameters_and_ddp_spawn_match_local_ascent(tmp_path, mode):
    results = run_ddp(mode, tmp_path)
    assert_ranks_identical(results)
    assert [r["allreduce_count"] for r in results] == [5, 5]
    assert_matches(results[0]["weights"], reference_local_ascent())


def test_accumulation_under_ddp_all_reduces_once_per_window(tmp_path):
    results = run_ddp("local_accum", tmp_path)  # 5 micro-batches per rank, windows of 2: 2 + 2 + 1
    assert_ranks_identical(results)
    assert results[0]["global_step"] == 3
    assert [r["allreduce_count"] for r in results] == [3, 3]
    assert_matches(results[0]["weights"], reference_local_ascent(accumulate=2))


@pytest.mark.parametrize("mode, count", [("mixin", 5), ("mixin_sync", 10)])
def test_mixin_under_ddp(tmp_path, mode, count):
    results = run_ddp(mode, tmp_path)
    assert_ranks_identical(results)
    assert [r["allreduce_count"] for r in results] == [count, count]
    expected = reference_local_ascent() if mode == "mixin" else reference_full_batch()
    assert_matches(results[0]["weights"], expected)


def test_sync_ascent_equals_full_batch_sam(tmp_path):
    results = run_ddp("sync", tmp_path)
    assert_ranks_identical(results)
    assert [r["allreduce_count"] for r in results] == [10, 10]
    assert_matches(results[0]["weights"], reference_full_batch())
    # and it differs from the local-ascent result (m-sharpness), so the two tests can tell them apart
    local = reference_local_ascent()
    assert max((results[0]["weights"][k] - v).abs().max().item() for k, v in local.state_dict().items()) > 1e-6


@pytest.mark.parametrize("mode", ["fp16", "fp16_fused", "fp16_mixin"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_all_ranks(tmp_path, mode):
    results = run_ddp(mode, tmp_path)  # rank 0 alone overflows in pass 1 of step 2: no deadlock
    assert_ranks_identical(results)
    for r in results:
        assert r["scales"] == [256.0, 256.0, 128.0, 128.0, 128.0]  # halved once, on every rank
        assert r["allreduce_count"] == 4  # the skipped step ran no pass 2


def test_reference_helpers_are_consistent():
    # the per-rank batches partition the data set
    seen = torch.cat([b[0] for r in range(2) for b in rank_batches(r)])
    assert seen.shape[0] == N_SAMPLES
    assert copy.deepcopy(make_mlp()) is not None


@pytest.mark.parametrize("mode", ["ssam_fisher", "ssam_dst"])
def test_ssam_masks_identical_on_every_rank(tmp_path, mode):
    results = run_ddp(mode, tmp_path)
    assert_ranks_identical(results)
    masks = [r["masks"] for r in results]
    assert masks[0] is not None and set(masks[0]) == set(masks[1])
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    kept = sum(m.sum().item() for m in masks[0].values())
    assert kept == round(195 * (1 - 0.7))


@pytest.mark.parametrize(
    "mode, count", [("fsam", 5), ("xsam", 5), ("xsam_k2", 5), ("looksam", 5), ("interval", 5), ("bar", 5)]
)
def test_fsam_and_xsam_keep_ranks_identical(tmp_path, mode, count):
    results = run_ddp(mode, tmp_path)
    assert_ranks_identical(results)
    # exactly one synchronized backward per step: pass 2, or pass 1 on the steps without pass 2 (the comm hook
    # counts gradient buckets only; XSAM's and LookSAM's direct all-reduces are not in this count)
    assert [r["allreduce_count"] for r in results] == [count, count]


def test_fsam_checkpoint_keeps_every_ranks_ema(tmp_path):
    run_ddp("fsam_ckpt", tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if "fsam" in k)
    per_rank = state["engine_per_rank"]
    assert len(per_rank) == 2
    ema = [r["variant_state"] for r in per_rank]
    assert ema[0]["step"] == ema[1]["step"] == 5
    first = next(k for k, v in ema[0].items() if isinstance(v, dict))
    name = next(iter(ema[0][first]))
    # local ascent: each rank averaged its own pass-1 gradients, so the EMAs differ and both are kept
    assert not torch.equal(ema[0][first][name], ema[1][first][name])


def test_mixin_fsam_checkpoint_keeps_every_ranks_ema(tmp_path):
    run_ddp("mixin_fsam_ckpt", tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    per_rank = checkpoint["lightning_sam.SAMMixin"][0]["engine_per_rank"]
    ema = [r["variant_state"]["ema"] for r in per_rank]
    name = next(iter(ema[0]))
    assert not torch.equal(ema[0][name], ema[1][name])
