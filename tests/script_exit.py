"""The end of every multi-process test script (``tests/*_script.py``, run by the tests as subprocesses)."""

from __future__ import annotations

import os
import sys


def finish() -> None:
    """Destroy the process group, then leave without the interpreter's finalization.

    A process that exits with its gloo group alive, and now and then one that destroyed it too, can abort at
    finalization (SIGABRT, "terminate called without an active exception": gloo's worker threads still hold tensors
    whose release needs the GIL while the interpreter is torn down; see pytorch/pytorch#179291). Everything a test
    reads has been written (and the ranks synchronized) before this is called, so the exit code stays that of the
    script's own work: an exception in ``main`` never gets here.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
