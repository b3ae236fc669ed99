"""The grouped GEMM of the MoE: rows sorted by expert, each group times its own expert's weight.

`grouped_gemm(x, w, offs)` is a torch custom op so that meta-device runs and `torch.compile` see only its
shape (torch's own meta kernel for `_grouped_mm` accepts bf16 alone). Its real kernel is
`torch._grouped_mm` when the operands allow it, else `grouped_gemm_loop`, the per-expert loop that is also
its reference in tests. On CPU both run one `mm` per expert on the same rows, so they agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_gemm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e].T; the groups end at `offs` [E] (cumulative counts).

    The slow, obviously correct twin: it reads `offs` on the host, so it syncs with the device.
    """
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[expert])
        start = end
    return out


def _aligned(t: torch.Tensor) -> bool:
    """Whether `t`'s last two dims are row- or column-major with 16-byte aligned leading strides."""
    align = 16 // t.element_size()
    rows, cols = t.stride(-2), t.stride(-1)
    if cols == 1 and rows >= max(1, t.shape[-1]):
        leading = rows
    elif rows == 1 and cols >= max(1, t.shape[-2]):
        leading = cols
    else:
        return False
    return leading % align == 0 and (t.device.type == "cpu" or t.data_ptr() % 16 == 0)


def fits_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` accepts these operands: one supported dtype, int32 offsets, aligned strides."""
    return (
        x.dim() == 2
        and w.dim() == 3
        and x.dtype == w.dtype
        and x.dtype in _GROUPED_MM_DTYPES
        and offs.dtype == torch.int32
        and _aligned(x)
        and _aligned(w.transpose(-2, -1))
    )


@torch.library.custom_op("omnistream::grouped_gemm", mutates_args=())
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows sorted by group, w [E, N, K], offs [E] int32 group ends (offs[-1] == M) -> [M, N]."""
    if fits_grouped_mm(x, w, offs):
        # Its output rows are padded to 16 bytes; the fake promises a contiguous result.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).contiguous()
    return grouped_gemm_loop(x, w, offs)


@grouped_gemm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])
