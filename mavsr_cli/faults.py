"""Fault injection for mavsr's own robustness tests, switched on by environment variables only.

Some faults cannot be produced on demand on a test machine (a GPU running out of memory on a CPU
box); these hooks raise the same exception the real fault raises, at the same place, so the code
that handles it is the code that runs. Nothing here is active unless its variable is set.

    MAVSR_FAULT_KILL_AT_STEP=N  train: SIGKILL the process right after step N's checkpoint
    MAVSR_FAULT_OOM_ABOVE=N     decode/train: a batch of more than N utterances raises
                                torch.OutOfMemoryError, as CUDA does when a batch does not fit
"""

from __future__ import annotations

import os

KILL_AT_STEP = "MAVSR_FAULT_KILL_AT_STEP"
OOM_ABOVE = "MAVSR_FAULT_OOM_ABOVE"


def maybe_oom(batch: int) -> None:
    limit = os.environ.get(OOM_ABOVE)
    if limit is not None and batch > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_ABOVE}={limit} for a batch of {batch})")
