"""The engine's checkpoint entry: rank 0's state, every rank's gathered, or tensors apart (distributed checkpoint);
sharded state that does not fit this run's shards starts fresh with a warning."""

from __future__ import annotations

import pytest
import torch

from lightning_sam import SAMEngine
from lightning_sam.checkpointing import (
    engine_checkpoint_state,
    engine_state_for_this_rank,
    entry_for_resume,
    put_engine_tensors,
    read_engine_tensors,
    shard_shapes,
    state_for_engine,
)
from lightning_sam.rank_tensors import placeholders, split_tensors


def fsam_engine() -> SAMEngine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine = SAMEngine(model.parameters(), "fsam")
    model(torch.randn(4, 3)).square().sum().backward()
    engine.ascend()
    engine.restore()
    return engine


def two_rank_sharded_entry(state: dict) -> dict:
    """What two FSDP2 ranks would have written with the tensors apart (each rank's skeleton, its shard shapes)."""
    skeletons = [split_tensors(state, f"rank{r}")[0] for r in range(2)]
    return {"engine": skeletons[0], "engine_per_rank": skeletons, "shard_shapes": [[[1, 3], [1]], [[1, 3], [1]]]}


def test_one_process_keeps_the_state_in_the_entry_and_nothing_apart():
    engine = fsam_engine()
    entry, tensors = engine_checkpoint_state(engine, tensors_apart=True)
    assert tensors == {} and set(entry) == {"engine"}
    assert isinstance(next(iter(entry["engine"]["variant_state"]["ema"].values())), torch.Tensor)
    assert shard_shapes(engine) == [[2, 3], [2]]
    assert state_for_engine(entry, engine) is entry["engine"]


def test_sharded_state_of_another_world_size_starts_fresh_without_reading_the_shards():
    """Another world size: no rank's shards fit; nothing is read, the variant state is dropped, the step kept."""
    entry = two_rank_sharded_entry(fsam_engine().state_dict())
    with pytest.warns(UserWarning, match="saved by 2 ranks, 1 run now.*'fsam' state .* starts fresh at step 0"):
        resumed = read_engine_tensors(entry, None, 0)  # no path needed: nothing to read
    assert not placeholders(resumed)
    engine = fsam_engine()
    state = state_for_engine(resumed, engine)
    assert state["step"] == 0 and state["variant_state"] == {}
    engine.load_state_dict(state)
    assert engine.variant.state_dict()["ema"] == {}


def test_sharded_state_of_other_shard_shapes_starts_fresh():
    """Same world size, another layout (e.g. FSDP2 -> tensor parallel): this rank's shards have other shapes."""
    engine = fsam_engine()
    state = engine.state_dict()
    fits = {"engine": state, "engine_per_rank": [state], "shard_shapes": [shard_shapes(engine)]}
    assert state_for_engine(fits, engine) is state
    other = {**fits, "shard_shapes": [[[1, 3], [1]]]}
    with pytest.warns(UserWarning, match="shards have other shapes than at the save"):
        assert state_for_engine(other, engine)["variant_state"] == {}
    # full-size (DDP) state of another world size: every rank takes rank 0's, which fits
    with pytest.warns(UserWarning, match="per-rank SAM state for 2 ranks, but 1 are running"):
        assert engine_state_for_this_rank({"engine": state, "engine_per_rank": [state, state]}) is state


def test_entries_without_placeholders_pass_through_and_no_trainer_drops_the_shards():
    entry = {"engine": {"variant": "sam", "step": 3, "variant_state": {}}}
    assert entry_for_resume(entry, None, 0) is entry
    sharded = two_rank_sharded_entry(fsam_engine().state_dict())
    with pytest.warns(UserWarning, match="loaded without a Trainer"):
        assert entry_for_resume(sharded, None, 0)["engine"]["variant_state"] == {}
    with pytest.raises(RuntimeError, match="save_weights_only"):
        put_engine_tensors({}, 0, {"rank0/t": torch.ones(1)})
