"""Per-rank state split into a picklable skeleton and tensors, and read back through torch.distributed.checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_sam.rank_tensors import (
    PLACEHOLDER,
    fill_tensors,
    load_rank_state,
    placeholders,
    read_tensors,
    save_rank_state,
    split_tensors,
)


def a_state() -> dict:
    return {
        "step": 7,
        "ema": {"net.0.weight": torch.randn(3, 4), "net.0.bias": torch.arange(3, dtype=torch.int32)},
        "kept": [None, torch.ones(0, dtype=torch.long), torch.tensor([True, False])],
        "pair": (1.5, torch.zeros(2, dtype=torch.bfloat16)),
    }


def test_split_then_fill_gives_the_same_state_and_the_skeleton_has_no_tensor():
    state = a_state()
    skeleton, tensors = split_tensors(state, "rank3")
    assert set(tensors) == {
        "rank3/ema/net.0.weight", "rank3/ema/net.0.bias", "rank3/kept/1", "rank3/kept/2", "rank3/pair/1"
    }  # fmt: skip
    weight = {PLACEHOLDER: "rank3/ema/net.0.weight", "shape": [3, 4], "dtype": "float32"}
    assert skeleton["ema"]["net.0.weight"] == weight
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    buffer.seek(0)
    skeleton = torch.load(buffer, weights_only=True)  # what Lightning's meta.pt loading allows
    assert placeholders(skeleton)["rank3/pair/1"] == ([2], torch.bfloat16)
    back = fill_tensors(skeleton, tensors)
    assert back["step"] == 7 and back["kept"][0] is None and back["pair"][0] == 1.5 and isinstance(back["pair"], tuple)
    for key, tensor in tensors.items():
        assert torch.equal(fill_tensors({PLACEHOLDER: key}, tensors), tensor)
    assert back["ema"]["net.0.weight"].data_ptr() == state["ema"]["net.0.weight"].data_ptr()  # no copy


def test_read_tensors_loads_a_ranks_keys_from_a_distributed_checkpoint(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    state = a_state()
    skeleton, tensors = split_tensors(state, "rank1")
    dcp.save({"state_dict": {"w": torch.ones(2)}, "optimizer_0": {"state": {}, "sam": tensors}}, checkpoint_id=tmp_path)
    back = read_tensors(str(tmp_path), ("optimizer_0", "sam"), skeleton)
    assert torch.equal(back["ema"]["net.0.weight"], state["ema"]["net.0.weight"])
    assert back["kept"][2].dtype == torch.bool and torch.equal(back["kept"][2], state["kept"][2])
    assert back["pair"][1].dtype == torch.bfloat16 and back["kept"][1].numel() == 0
    assert read_tensors(str(tmp_path), ("optimizer_0", "sam"), {"step": 1}) == {"step": 1}  # nothing to read


def test_save_and_load_rank_state_round_trip_and_refuse_another_world_size(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    state = a_state()
    save_rank_state(state, tmp_path / "one")
    back = load_rank_state(tmp_path / "one")
    assert back["step"] == 7 and torch.equal(back["ema"]["net.0.weight"], state["ema"]["net.0.weight"])
    # what two ranks would have written: every rank (here the only one) refuses before any collective
    two = {"skeletons": {"rank0": b"", "rank1": b""}, "tensors": {"rank0/x": torch.ones(1), "rank1/x": torch.ones(1)}}
    dcp.save(two, checkpoint_id=tmp_path / "two")
    with pytest.raises(RuntimeError, match="holds the SAM state of 2 ranks, but 1 run now"):
        load_rank_state(tmp_path / "two")
