"""Peak host memory of a piece of code, from torch's own record of every CPU allocation and free."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class Peak:
    bytes: int = 0


@contextmanager
def peak_allocated() -> Iterator[Peak]:
    """The largest number of bytes that tensors allocated inside the block held at once, counted from the
    profiler's memory events (allocations positive, frees negative, in time order); tensors that existed before
    the block count only when freed inside it (they lower the count)."""
    peak = Peak()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peak
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = 0
    for _, nbytes in events:
        live += nbytes
        peak.bytes = max(peak.bytes, live)
