"""SAM under Lightning's ModelParallelStrategy on CPU ranks (gloo): FSDP2 (2 ranks), tensor parallel (2 ranks) and
both (2 x 2 mesh, 4 ranks) runs equal the same variant in one process on the union of the data-parallel ranks'
batches (cases in tests/sharded_cases.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from sharded_cases import CASES, build_net, fit

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_script.py")
pytestmark = pytest.mark.slow

SSAM = ["ssam_fisher", "ssam_sparse", "ssam_structured", "ssam_dst", "ssam_zero", "mixin_ssam"]
TRAINED = ["sam", "asam", "fsam", "looksam", "xsam", "interval", "mixin_fsam", "bf16", "bf16_true", *SSAM, "ssam_nm"]
REFUSED = ["refuse_local_ascent"]
RESUMED = ["fsam_straight", "fsam_resumed", "looksam_straight", "looksam_resumed"]
MIXIN_RESUMED = ["mixin_fsam_straight", "mixin_fsam_resumed", "mixin_fsam_weights_only"]
SSAM_RESUMED = ["ssam_dst_straight", "ssam_dst_resumed"]
# the 2-D mesh (4 processes on CI's 2 cores) runs the cases that exercise its placements: _StridedShard and
# Shard x Shard weights, Shard x Replicate biases, FSDP-only layers held by both TP ranks
LAYOUT_CASES = {
    "fsdp": TRAINED + REFUSED + RESUMED + MIXIN_RESUMED + SSAM_RESUMED,
    "tp": [c for c in TRAINED if c != "ssam_nm"] + REFUSED + ["refuse_ssam_nm"] + RESUMED + MIXIN_RESUMED,
    "fsdp_tp": [
        *["sam", "asam", "fsam", "looksam", "xsam", "mixin_fsam", "fsam_straight", "fsam_resumed"],
        *["ssam_fisher", "ssam_dst"],
    ],
}
# fp32: the sharded run sums the same products in another order (reduce-scatter, shard norms); bf16: a batch of 8
# instead of 16 per matmul rounds differently (bf16-true: a few ulps of bf16 weights, 2**-7 each for weights in [1, 2))
TOLERANCE = {"bf16": 5e-3, "bf16_true": 1e-2}


def run_sharded(layout: str, cases: list[str], out_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, SCRIPT, layout, str(out_dir), *cases], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(out_dir / f"{layout}.pt", weights_only=False)


@pytest.fixture(scope="module", params=list(LAYOUT_CASES))
def sharded_runs(request, tmp_path_factory):
    layout = request.param
    out = tmp_path_factory.mktemp(layout)
    return layout, out, run_sharded(layout, LAYOUT_CASES[layout], out)


def case_of(sharded_runs, case: str) -> tuple[str, object, dict]:
    layout, out, results = sharded_runs
    if case not in results:
        pytest.skip(f"{case} does not run on the {layout} layout")
    return layout, out, results


@pytest.mark.parametrize("case", TRAINED)
def test_sharded_run_equals_one_process_on_the_union_batch(sharded_runs, case):
    layout, out, results = case_of(sharded_runs, case)
    expected, logged, _ = fit(CASES[case], f"single-{layout}", out / f"single-{case}")
    got = results[case]["weights"]
    tolerance = TOLERANCE.get(case, 1e-5)
    for name, weight in expected.items():
        difference = (got[name] - weight).abs().max().item()
        assert difference <= tolerance, f"{layout} {case} {name}: {difference:.3g} > {tolerance:.3g}"
    # the logged metrics are global values: those of the one process on the union batch
    for name, value in results[case]["metrics"].items():
        if "seconds" not in name:
            assert value == pytest.approx(logged[name], abs=max(tolerance, 1e-6)), f"{layout} {case} {name}"
    # the variant's effect is far above the tolerance: a sharded run that skipped SAM would fail the check above
    plain, _, _ = fit(CASES[case].without_sam(), f"single-{layout}", out / f"plain-{case}")
    assert max((plain[name] - weight).abs().max().item() for name, weight in expected.items()) > 5 * tolerance


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("refuse_ssam_nm", "N:M pattern needs each rank to hold whole rows of 'net.2.weight'.*Shard it along dim 0"),
        ("refuse_local_ascent", "sync_ascent=False .* cannot be honoured under ModelParallelStrategy"),
    ],
)
def test_what_sharded_training_does_not_support_is_refused_at_setup(sharded_runs, case, message):
    _, _, results = case_of(sharded_runs, case)
    assert "error" in results[case], f"{case} trained instead of refusing"
    assert __import__("re").search(message, results[case]["error"]), results[case]["error"]


@pytest.mark.parametrize(("case", "sparsity"), [("ssam_fisher", 0.7), ("ssam_dst", 0.7)])
def test_ssam_mask_density_over_the_shards_is_exact(sharded_runs, case, sparsity):
    _, _, results = case_of(sharded_runs, case)
    total = sum(p.numel() for p in build_net().parameters())
    assert results[case]["metrics"]["sam/mask_density_step"] == pytest.approx(
        round(total * (1 - sparsity)) / total, abs=1e-7
    )


def test_ssam_sparse_storage_equals_dense_on_the_shards(sharded_runs):
    _, _, results = case_of(sharded_runs, "ssam_sparse")
    for name, weight in results["ssam_fisher"]["weights"].items():
        assert torch.equal(results["ssam_sparse"]["weights"][name], weight), name


def test_ssam_at_sparsity_zero_is_sam(sharded_runs):
    _, _, results = case_of(sharded_runs, "ssam_zero")
    for name, weight in results["sam"]["weights"].items():
        assert (results["ssam_zero"]["weights"][name] - weight).abs().max().item() <= 1e-7, name


def test_ssam_dst_resume_at_an_epoch_boundary_is_exact(sharded_runs):
    """Each rank's kept indices (of its shards) and the DST draw counter travel through the checkpoint."""
    layout, _, results = case_of(sharded_runs, "ssam_dst_straight")
    straight, resumed = results["ssam_dst_straight"]["weights"], results["ssam_dst_resumed"]["weights"]
    for name, weight in straight.items():
        assert torch.equal(weight, resumed[name]), f"{layout} {name}"


@pytest.mark.parametrize("variant", ["fsam", "looksam", "mixin_fsam"])
def test_resume_at_an_epoch_boundary_is_exact_with_every_ranks_shard_state(sharded_runs, variant):
    """Lightning's distributed checkpoint writes each rank's shard of the engine state (in the optimizer state, per
    rank); ``meta.pt`` (rank 0 alone) holds only placeholders; each rank resumes its own shard."""
    from lightning_sam.rank_tensors import placeholders, read_tensors

    layout, out, results = case_of(sharded_runs, f"{variant}_straight")
    straight, resumed = results[f"{variant}_straight"]["weights"], results[f"{variant}_resumed"]["weights"]
    for name, weight in straight.items():
        assert torch.equal(weight, resumed[name]), f"{layout} {variant} {name}"
    checkpoint = next((out / f"{variant}_straight" / "checkpoints").glob("epoch=0-*"))
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    if variant.startswith("mixin"):
        entry = meta["lightning_sam.SAMMixin"][0]
    else:
        (entry,) = [s for key, s in meta["callbacks"].items() if key.startswith("SAMCallback")]
    per_rank = entry["engine_per_rank"]
    assert len(per_rank) == (4 if layout == "fsdp_tp" else 2)
    leaves = []
    torch.utils._pytree.tree_map(leaves.append, entry)
    assert not any(isinstance(leaf, torch.Tensor) for leaf in leaves), "meta.pt holds tensors of the engine state"
    buffers = "ema" if "fsam" in variant else "g_v"
    ranks = [read_tensors(str(checkpoint), ("optimizer_0", "lightning_sam"), per_rank[r]) for r in range(2)]
    ranks = [state["variant_state"][buffers] for state in ranks]
    assert set(placeholders(per_rank[1])) and all(key.startswith("rank1/") for key in placeholders(per_rank[1]))
    # the shards differ between the ranks (different slices of the same weights), each a shard's size
    assert any(not torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    whole = sum(p.numel() for p in build_net().parameters())
    assert sum(t.numel() for t in ranks[0].values()) < whole


def test_a_weights_only_checkpoint_of_the_mixin_holds_no_sam_state(sharded_runs):
    """save_weights_only=True: no optimizer state to carry the shards, so the mixin writes no SAM entry (and the
    run trains on, equal to the same run without checkpoints)."""
    layout, out, results = case_of(sharded_runs, "mixin_fsam_weights_only")
    for name, weight in results["mixin_fsam"]["weights"].items():
        assert torch.equal(results["mixin_fsam_weights_only"]["weights"][name], weight), f"{layout} {name}"
    checkpoint = next((out / "mixin_fsam_weights_only" / "checkpoints").glob("epoch=0-*"))
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    assert "lightning_sam.SAMMixin" not in meta and "optimizer_states" not in meta


def test_the_sharded_example_trains_on_two_ranks():
    """examples/sharded_sam.py --quick: F-SAM under FSDP2 on 2 CPU ranks learns the digits, and each rank holds half
    of the parameters and of SAM's state."""
    pytest.importorskip("sklearn")
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "sharded_sam.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    completed = subprocess.run(
        [sys.executable, example, "--quick"], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, completed.stdout
    for line in lines:
        accuracy = float(line.split("test accuracy ")[1].split(",")[0])
        assert accuracy > 0.5, line  # 1 epoch; 10 classes
        parameters = float(line.split("parameters ")[1].split(" MiB")[0])
        saved = float(line.split("SAM saved copy ")[1].split(" MiB")[0])
        state = float(line.split("fsam state ")[1].split(" MiB")[0])
        assert saved == parameters == state  # everything SAM keeps is per shard
        assert parameters < 0.6 * 0.13  # the whole MLP is ~0.13 MiB: each rank holds about half
