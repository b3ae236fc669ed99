"""Memory for the paged KV caches: on CPU, zeroed anonymous memory advised onto transparent huge pages.

Attention reads a request's pages scattered over a cache of gigabytes; on 4 KiB pages nearly every KV page visited
is a TLB miss (with its page walk), which on CPU cost the attention kernel about half its time in
benchmarks/attention.py. With MADV_HUGEPAGE (Linux, THP in `madvise` or `always` mode) the kernel backs the cache
with 2 MiB pages where it can; elsewhere the advice is skipped and the memory is the same zeroed tensor.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeroed_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of `shape`; on CPU in a fresh anonymous mapping advised onto huge pages."""
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    # anonymous and private (shared anonymous memory is shmem, which THP leaves alone), zero-filled; the tensor
    # keeps the mapping alive
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
