"""Weights on transparent huge pages (THP): CPU tensors in anonymous memory advised MADV_HUGEPAGE.

Owns where such a tensor's memory comes from and which tensors live there (`holds`). A weight read whole at every
step (the lm_head: 78 MB in fp32 for the tiny model) then spans a few dozen 2 MB pages instead of ~19,000 4 KB
ones, so the scan stops missing the TLB. Only where the kernel offers THP ("always" or "madvise" in
/sys/kernel/mm/transparent_hugepage/enabled); otherwise, or when the advice is refused, torch's own allocation.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import re
import weakref
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KB base pages) PMD size
_regions: list[tuple[int, int, weakref.ref]] = []  # [start, end) of each live mapping handed out, and the mapping


def thp_mode() -> str | None:
    """The kernel's THP setting ("always", "madvise", "never"), or None where it does not say (no THP, not Linux)."""
    try:
        selected = re.search(r"\[(\w+)\]", THP_ENABLED.read_text())
    except OSError:
        return None
    return selected.group(1) if selected else None


def available() -> bool:
    """Whether advised memory can get huge pages here."""
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages where `available()` (its first byte on a 2 MB
    boundary, its mapping advised before any page is touched), else from torch's allocator."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes == 0 or not available():
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = _address(region)
    offset = -address % HUGE_PAGE_BYTES
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)  # offset: a multiple of the page size
    except OSError as exc:
        logger.warning("huge pages: madvise(MADV_HUGEPAGE) refused (%s); torch's allocation is used", exc)
        region.close()
        return torch.empty(shape, dtype=dtype)
    _regions[:] = [r for r in _regions if r[2]() is not None]
    _regions.append((address + offset, address + offset + nbytes, weakref.ref(region)))
    # the tensor keeps `region` alive (frombuffer holds a reference to its buffer); the mapping goes with it
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset).view(shape)


def holds(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s memory was handed out by `empty` on huge pages (and is still mapped)."""
    start = tensor.data_ptr()
    return any(lo <= start < hi and ref() is not None for lo, hi, ref in _regions)


def place(parameter: torch.nn.Parameter) -> None:
    """Move a CPU parameter's storage onto huge pages (its values copied), where `available()`."""
    if parameter.device.type != "cpu" or not available() or holds(parameter.data):
        return
    target = empty(parameter.shape, parameter.dtype)
    target.copy_(parameter.data)
    parameter.data = target


def _address(region: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(region)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the buffer export at once
