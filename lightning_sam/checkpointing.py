"""What a Lightning checkpoint holds of a SAM engine, for both adapters.

Variant state that is the same on every rank is the engine's ``state_dict()`` in the adapter's checkpoint entry
(``{"engine": state}``), written by rank 0 as Lightning writes every callback state.

Variant state that differs per rank (``variant.per_rank_state``: F-SAM's EMA under a local ascent, and every
variant's buffers under sharded parameters) goes one of two ways:

- **one checkpoint file** (DDP; ``ModelParallelStrategy(save_distributed_checkpoint=False)``): every rank's state is
  gathered into the entry (``"engine_per_rank"``) and each rank resumes its own;
- **Lightning's distributed checkpoint** (``ModelParallelStrategy``, the default): no gather. Each rank's tensors ride
  in its optimizer's state (``optimizer_states[i]["lightning_sam"]``, keyed by rank), which Lightning writes per rank
  through ``torch.distributed.checkpoint``; the entry in ``meta.pt`` holds every rank's skeleton (numbers and
  tensor placeholders, see :mod:`lightning_sam.rank_tensors`). At resume each rank reads its own tensors back (or
  takes them from the optimizer state of a checkpoint consolidated into one file).

Either way a resume needs the world size of the save for per-rank state (else every rank takes rank 0's, with a
warning); sharded state also needs the same parallel layout.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sam.distributed import gather_objects, rank, world_size
from lightning_sam.engine import SAMEngine
from lightning_sam.rank_tensors import fill_tensors, placeholders, read_tensors, split_tensors

OPTIMIZER_STATE_KEY = "lightning_sam"  # where each rank's engine tensors ride in a checkpoint's optimizer state


def engine_checkpoint_state(
    engine: SAMEngine, *, tensors_apart: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(entry, tensors)``: the checkpoint entry of ``engine`` and, with ``tensors_apart`` and per-rank state, this
    rank's tensors to write through the distributed checkpoint (else empty). A collective when the state is per rank
    and several processes run: every rank calls it."""
    state = engine.state_dict()
    if not (engine.variant.per_rank_state and world_size() > 1):
        return {"engine": state}, {}
    if not tensors_apart:
        return {"engine": state, "engine_per_rank": gather_objects(state)}, {}
    skeleton, tensors = split_tensors(state, f"rank{rank()}")
    skeletons = gather_objects(skeleton)  # small: numbers and placeholders
    return {"engine": skeletons[0], "engine_per_rank": skeletons}, tensors


def engine_state_for_this_rank(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's engine state: its own when the checkpoint holds one per rank (same world size), else rank 0's."""
    per_rank = state.get("engine_per_rank")
    if per_rank and len(per_rank) == world_size():
        return per_rank[rank()]
    if per_rank:
        rank_zero_warn(
            f"The checkpoint holds per-rank SAM state for {len(per_rank)} ranks, but {world_size()} are running: "
            "every rank resumes from rank 0's state."
        )
    return state["engine"]


def read_engine_tensors(
    entry: dict[str, Any], checkpoint: dict[str, Any], checkpoint_dir: str | None, optimizer_index: int
) -> dict[str, Any]:
    """``entry`` ready for :func:`engine_state_for_this_rank`: when its state was saved with the tensors apart, this
    rank's state with its tensors filled in, from the loaded ``checkpoint``'s optimizer state when it holds them (a
    consolidated, single-file checkpoint) or else read from the distributed checkpoint in ``checkpoint_dir`` (a
    collective: every rank calls it; all hold the same entry, from ``meta.pt``). Other entries are returned as is."""
    if not placeholders(entry):
        return entry
    own = engine_state_for_this_rank(entry)
    states = checkpoint.get("optimizer_states") or []
    if optimizer_index < len(states) and OPTIMIZER_STATE_KEY in states[optimizer_index]:
        return {"engine": fill_tensors(own, states[optimizer_index][OPTIMIZER_STATE_KEY])}
    if checkpoint_dir is None:
        raise RuntimeError(
            "The SAM state in this checkpoint keeps its tensors in the distributed checkpoint's optimizer state, but "
            "the trainer does not know the checkpoint's path: resume with trainer.fit(model, ckpt_path=...)."
        )
    return {"engine": read_tensors(str(checkpoint_dir), (f"optimizer_{optimizer_index}", OPTIMIZER_STATE_KEY), own)}


def put_engine_tensors(checkpoint: dict[str, Any], optimizer_index: int, tensors: dict[str, Tensor]) -> None:
    """Put this rank's engine tensors into the checkpoint's optimizer state (written per rank by the strategy)."""
    if not tensors:
        return
    states = checkpoint.get("optimizer_states") or []
    if optimizer_index >= len(states):
        raise RuntimeError(
            "The checkpoint has no optimizer state to carry the SAM state of each rank; per-rank SAM state needs a "
            "full checkpoint (not save_weights_only=True) to resume."
        )
    states[optimizer_index][OPTIMIZER_STATE_KEY] = tensors


__all__ = [
    "OPTIMIZER_STATE_KEY",
    "engine_checkpoint_state",
    "engine_state_for_this_rank",
    "put_engine_tensors",
    "read_engine_tensors",
]
