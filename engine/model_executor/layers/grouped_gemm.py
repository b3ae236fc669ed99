"""The grouped GEMM of the MoE: rows sorted by expert, each group times its own expert's weight.

`grouped_gemm(x, w, offs)` is a torch custom op, `omnistream::grouped_gemm`, with a fake (shape-only) kernel,
so that meta-device runs and `torch.compile` see only its shape (torch's own meta kernel for `_grouped_mm`
accepts bf16 alone). Its real kernel is `torch._grouped_mm` when the operands allow it, else
`grouped_gemm_loop`, the per-expert loop that is also its reference in tests. On CPU both run one `mm` per
expert on the same rows, so they agree bit for bit.
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


def _aligned(t: torch.Tensor, height: int, width: int, rows: int, cols: int) -> bool:
    """Whether a [height, width] matrix in `t`'s storage with strides (rows, cols) is column- or row-major
    with a 16-byte aligned leading stride and, off the CPU, a 16-byte aligned start (`_grouped_mm`'s rule)."""
    if rows == 1 and cols >= max(1, height):
        leading = cols
    elif cols == 1 and rows >= max(1, width):
        leading = rows
    else:
        return False
    return leading * t.element_size() % 16 == 0 and (t.device.type == "cpu" or t.data_ptr() % 16 == 0)


def fits_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)` is allowed: one of its dtypes on both
    sides, int32 offsets, and 16-byte aligned strides on both operands."""
    return (
        x.dtype in _GROUPED_MM_DTYPES
        and w.dtype == x.dtype
        and offs.dtype == torch.int32
        and x.dim() == 2
        and w.dim() == 3
        and _aligned(x, x.shape[0], x.shape[1], x.stride(0), x.stride(1))
        and _aligned(w, w.shape[2], w.shape[1], w.stride(2), w.stride(1))  # w[e].T: [K, N]
    )


@torch.library.custom_op("omnistream::grouped_gemm", mutates_args=())
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows sorted by group, w [E, N, K], offs [E] int32 group ends (offs[-1] == M) -> [M, N]:
    out[rows of group e] = x[rows of group e] @ w[e].T."""
    if fits_grouped_mm(x, w, offs):
        # Its output rows are padded to 16 bytes; the fake promises a contiguous result.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).contiguous()
    return grouped_gemm_loop(x, w, offs)


@grouped_gemm.register_fake
def _grouped_gemm_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])
