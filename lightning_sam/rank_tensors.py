"""Per-rank state through ``torch.distributed.checkpoint`` (DCP): each rank writes and reads its own tensors.

Under sharded training a variant's state differs on every rank (F-SAM's EMA of the rank's shards, LookSAM's ``g_v``,
SSAM's kept indices and Fisher sums). Gathering it into one file would put the whole state in one process's memory;
instead the state is split in two:

- a *skeleton*: the state with every tensor replaced by a placeholder ``{PLACEHOLDER: key, "shape": [...],
  "dtype": "float32"}``: small, picklable with ``weights_only=True``, kept with the checkpoint's metadata;
- the tensors, keyed ``"rank<r>/<path in the state>"``: written by a DCP save in which every rank contributes its own
  keys (DCP writes a plain tensor once per key, so distinct keys means each rank writes exactly its own).

:func:`read_tensors` loads a skeleton's tensors back from the checkpoint directory (a collective: every rank calls
it, with its own skeleton). Outside the Trainer, :func:`save_rank_state` / :func:`load_rank_state` write and read a
whole per-rank state in a directory of its own. Pure PyTorch: no Lightning import.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sam.distributed import rank, world_size

PLACEHOLDER = "lightning_sam.rank_tensor"


def split_tensors(state: Any, prefix: str) -> tuple[Any, dict[str, Tensor]]:
    """``(skeleton, tensors)``: ``state`` (nested dicts, lists, tuples) with each tensor replaced by a placeholder, and
    the tensors by key (``f"{prefix}/{path}"``, the path of the tensor in ``state`` joined by ``/``). The tensors are
    the state's own (detached, not copied)."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, Tensor):
            key = "/".join((prefix, *path))
            tensors[key] = node.detach()
            return {PLACEHOLDER: key, "shape": list(node.shape), "dtype": str(node.dtype).removeprefix("torch.")}
        if isinstance(node, dict):
            return {name: walk(value, (*path, str(name))) for name, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(value, (*path, str(i))) for i, value in enumerate(node))
        return node

    return walk(state, ()), tensors


def _is_placeholder(node: Any) -> bool:
    return isinstance(node, dict) and PLACEHOLDER in node


def placeholders(skeleton: Any) -> dict[str, tuple[list[int], torch.dtype]]:
    """The tensors a skeleton stands for: ``{key: (shape, dtype)}``."""
    found: dict[str, tuple[list[int], torch.dtype]] = {}

    def walk(node: Any) -> None:
        if _is_placeholder(node):
            found[node[PLACEHOLDER]] = (list(node["shape"]), getattr(torch, node["dtype"]))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(skeleton)
    return found


def fill_tensors(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """The state a skeleton stands for, each placeholder replaced by ``tensors[key]``."""
    if _is_placeholder(skeleton):
        return tensors[skeleton[PLACEHOLDER]]
    if isinstance(skeleton, dict):
        return {name: fill_tensors(value, tensors) for name, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(fill_tensors(value, tensors) for value in skeleton)
    return skeleton


def read_tensors(checkpoint_dir: str, namespace: Sequence[str], skeleton: Any) -> Any:
    """``skeleton`` filled from the DCP checkpoint in ``checkpoint_dir``, where its tensors were saved under the nested
    keys ``namespace`` (e.g. ``("optimizer_0", "lightning_sam")``). Loaded on the CPU. A collective under
    torch.distributed: every rank calls it (a rank without tensors passes a skeleton without placeholders)."""
    import torch.distributed.checkpoint as dcp

    templates = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in placeholders(skeleton).items()}
    nested: dict[str, Any] = templates
    for name in reversed(namespace):
        nested = {name: nested}
    dcp.load(nested, checkpoint_id=checkpoint_dir)
    return fill_tensors(skeleton, templates)


def save_rank_state(state: Any, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Write ``state`` (e.g. ``engine.state_dict()``) of every rank into one DCP checkpoint directory, each rank its
    own: its skeleton (serialized, under ``skeletons/rank<r>``) and its tensors. A collective: every rank calls it.
    For loops outside the Trainer (Fabric under ``ModelParallelStrategy``, plain ``torch.distributed``), where
    ``fabric.save`` would keep rank 0's state only; read it back with :func:`load_rank_state`."""
    import torch.distributed.checkpoint as dcp

    skeleton, tensors = split_tensors(state, f"rank{rank()}")
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    dcp.save({"skeletons": {f"rank{rank()}": buffer.getvalue()}, "tensors": tensors}, checkpoint_id=checkpoint_dir)


def load_rank_state(checkpoint_dir: str | os.PathLike[str]) -> Any:
    """This rank's state written by :func:`save_rank_state` (tensors on the CPU; the variants move them to their
    parameters' device when loaded). The world size must be the one of the save (else every rank raises). A
    collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    own, world = f"rank{rank()}", world_size()
    saved = dcp.FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    ranks = sum(key.startswith("skeletons.rank") for key in saved)
    if ranks != world:  # every rank sees the same metadata: all raise, none waits in the collective below
        raise RuntimeError(
            f"{checkpoint_dir} holds the SAM state of {ranks} ranks, but {world} run now: per-rank state resumes with "
            "the world size (and parallel layout) it was saved with."
        )
    blobs: dict[str, Any] = {own: b""}
    dcp.load({"skeletons": blobs}, checkpoint_id=checkpoint_dir)
    skeleton = torch.load(io.BytesIO(blobs[own]), weights_only=True)
    return read_tensors(str(checkpoint_dir), ("tensors",), skeleton)


__all__ = [
    "PLACEHOLDER",
    "fill_tensors",
    "load_rank_state",
    "placeholders",
    "read_tensors",
    "save_rank_state",
    "split_tensors",
]
