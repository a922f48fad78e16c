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
  tensor placeholders, see :mod:`lightning_sam.rank_tensors`). At resume each rank reads its own tensors back.

Per-rank state resumes under the world size of the save. Under DDP (full-size state) another world size makes every
rank take rank 0's state, with a warning. Sharded state (the entry records each rank's shard shapes) fits only the
layout it was saved under: under another world size or layout the variant state starts fresh (the step counter is
kept), with a warning, instead of loading shards of other coordinates.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sam.distributed import gather_objects, rank, world_size
from lightning_sam.engine import SAMEngine
from lightning_sam.rank_tensors import placeholders, read_tensors, split_tensors

OPTIMIZER_STATE_KEY = "lightning_sam"  # where each rank's engine tensors ride in a checkpoint's optimizer state


def shard_shapes(engine: SAMEngine) -> list[list[int]]:
    """The shapes of this rank's shards of the engine's parameters: the layout its per-rank state belongs to."""
    return [list(t.shape) for t in engine._locals]


def engine_checkpoint_state(
    engine: SAMEngine, *, tensors_apart: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(entry, tensors)``: the checkpoint entry of ``engine`` and, with ``tensors_apart`` and per-rank state, this
    rank's tensors to write through the distributed checkpoint (else empty). A collective when the state is per rank
    and several processes run: every rank calls it. Sharded state also records each rank's shard shapes."""
    state = engine.state_dict()
    if not (engine.variant.per_rank_state and world_size() > 1):
        return {"engine": state}, {}
    tensors: dict[str, Tensor] = {}
    if tensors_apart:
        state, tensors = split_tensors(state, f"rank{rank()}")  # the skeleton: numbers and placeholders
    entry = {"engine_per_rank": gather_objects(state)}
    if engine.sharded:
        entry["shard_shapes"] = gather_objects(shard_shapes(engine))
    return {"engine": entry["engine_per_rank"][0], **entry}, tensors


def engine_state_for_this_rank(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's engine state: its own when the checkpoint holds one per rank (same world size), else rank 0's
    (full-size state under DDP: valid on every rank); sharded state of another world size starts fresh (see
    :func:`without_variant_state`)."""
    per_rank = state.get("engine_per_rank")
    if per_rank and len(per_rank) == world_size():
        return per_rank[rank()]
    if per_rank and "shard_shapes" in state:
        return without_variant_state(state["engine"], f"it was saved by {len(per_rank)} ranks, {world_size()} run now")
    if per_rank:
        rank_zero_warn(
            f"The checkpoint holds per-rank SAM state for {len(per_rank)} ranks, but {world_size()} are running: "
            "every rank resumes from rank 0's state."
        )
    return state["engine"]


def without_variant_state(state: dict[str, Any], why: str) -> dict[str, Any]:
    """``state`` with its variant state dropped (the step counter kept), with a warning that says ``why``: sharded
    per-rank state (F-SAM's EMA, SSAM's masks of each shard) fits only the layout it was saved under."""
    rank_zero_warn(
        f"The checkpoint's SAM variant state is per shard, and {why}: it does not fit this run's shards, so the "
        f"{state.get('variant')!r} state (EMA, masks, direction estimates) starts fresh at step {state.get('step')}. "
        "Resume with the world size and parallel layout of the save to continue it exactly."
    )
    return {**state, "variant_state": {}}


def state_for_engine(entry: dict[str, Any], engine: SAMEngine) -> dict[str, Any]:
    """The state ``engine`` loads from a checkpoint entry: this rank's, with sharded variant state dropped (and a
    warning) when this rank's shards differ from the ones it was saved with (same world size, another layout)."""
    state = engine_state_for_this_rank(entry)
    saved = entry.get("shard_shapes")
    if saved and len(saved) == world_size() and saved[rank()] != shard_shapes(engine):
        return without_variant_state(state, "this rank's shards have other shapes than at the save")
    return state


def read_engine_tensors(entry: dict[str, Any], checkpoint_dir: str | None, optimizer_index: int) -> dict[str, Any]:
    """``entry`` with this rank's tensors read back, when its state was saved with the tensors apart: from the
    distributed checkpoint in ``checkpoint_dir`` (a collective: every rank calls it; all hold the same entry, from
    ``meta.pt``). Under another world size nothing is read: the entry drops its variant state (with a warning).
    Other entries are returned as they are."""
    if not placeholders(entry):
        return entry
    per_rank = entry.get("engine_per_rank") or []
    if len(per_rank) != world_size():
        return {"engine": engine_state_for_this_rank(entry)}  # the variant state dropped, with a warning
    if checkpoint_dir is None:
        raise RuntimeError(
            "The SAM state in this checkpoint keeps its tensors in the distributed checkpoint's optimizer state, but "
            "the trainer does not know the checkpoint's path: resume with trainer.fit(model, ckpt_path=...)."
        )
    own = read_tensors(str(checkpoint_dir), (f"optimizer_{optimizer_index}", OPTIMIZER_STATE_KEY), per_rank[rank()])
    return {"engine": own, "shard_shapes": entry.get("shard_shapes")}  # this rank's state, and the layout check


def entry_for_resume(entry: dict[str, Any], trainer: Trainer | None, optimizer_index: int) -> dict[str, Any]:
    """A checkpoint entry as loaded from ``meta.pt``, ready for :func:`state_for_engine`: with tensors saved apart,
    this rank's read from the checkpoint the strategy loaded (rank 0's path, broadcast: a collective that every rank
    reaches, as all hold the same entry). Without a Trainer (``load_from_checkpoint``) they cannot be read: the
    variant state is dropped, with a warning."""
    if not placeholders(entry):
        return entry
    if trainer is None:
        return {"engine": without_variant_state(entry["engine"], "it was loaded without a Trainer")}
    return read_engine_tensors(entry, trainer.strategy.broadcast(trainer.ckpt_path), optimizer_index)


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
    "entry_for_resume",
    "put_engine_tensors",
    "read_engine_tensors",
    "shard_shapes",
    "state_for_engine",
    "without_variant_state",
]
