"""The engine's checkpoint entry: rank 0's state, every rank's gathered, or tensors apart (distributed checkpoint)."""

from __future__ import annotations

import pytest
import torch

from lightning_sam import SAMEngine
from lightning_sam.checkpointing import (
    OPTIMIZER_STATE_KEY,
    engine_checkpoint_state,
    put_engine_tensors,
    read_engine_tensors,
)
from lightning_sam.rank_tensors import split_tensors


def fsam_engine() -> SAMEngine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine = SAMEngine(model.parameters(), "fsam")
    model(torch.randn(4, 3)).square().sum().backward()
    engine.ascend()
    engine.restore()
    return engine


def test_one_process_keeps_the_state_in_the_entry_and_nothing_apart():
    engine = fsam_engine()
    entry, tensors = engine_checkpoint_state(engine, tensors_apart=True)
    assert tensors == {} and set(entry) == {"engine"}
    assert isinstance(next(iter(entry["engine"]["variant_state"]["ema"].values())), torch.Tensor)


def test_a_consolidated_checkpoint_fills_the_placeholders_from_its_optimizer_state():
    """A distributed checkpoint consolidated into one file holds each rank's tensors in its optimizer state: a resume
    takes rank 0's (one process running) from there, without a distributed read."""
    state = fsam_engine().state_dict()
    skeleton, tensors = split_tensors(state, "rank0")
    entry = {"engine": skeleton, "engine_per_rank": [skeleton, split_tensors(state, "rank1")[0]]}
    checkpoint = {"optimizer_states": [{"state": {}, "param_groups": []}]}
    put_engine_tensors(checkpoint, 0, tensors)
    assert checkpoint["optimizer_states"][0][OPTIMIZER_STATE_KEY] is tensors
    with pytest.warns(UserWarning, match="per-rank SAM state for 2 ranks, but 1 are running"):
        filled = read_engine_tensors(entry, checkpoint, None, 0)
    for name, ema in state["variant_state"]["ema"].items():
        assert torch.equal(filled["engine"]["variant_state"]["ema"][name], ema)
    engine = fsam_engine()
    engine.load_state_dict(filled["engine"])


def test_entries_without_placeholders_pass_through_and_missing_places_raise():
    entry = {"engine": {"variant": "sam", "step": 3, "variant_state": {}}}
    assert read_engine_tensors(entry, {}, None, 0) is entry
    skeleton, _ = split_tensors({"t": torch.ones(1)}, "rank0")
    with pytest.raises(RuntimeError, match="ckpt_path"):
        read_engine_tensors({"engine": skeleton}, {}, None, 0)
    with pytest.raises(RuntimeError, match="save_weights_only"):
        put_engine_tensors({}, 0, {"rank0/t": torch.ones(1)})
