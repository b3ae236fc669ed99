"""Self-attention over a caller-held K/V buffer (not the paged cache): the code predictor and code2wav.

The caller owns the buffer and says which keys each query sees (`visible`), so fixed-shape buffers (the code
predictor's 16 positions, code2wav's 72-frame ring) need no special kernel. Built whole on one rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear
from omnistream.engine.model_executor.layers.norm import RMSNorm
from omnistream.engine.model_executor.layers.rotary import apply_rotary


class DenseSelfAttention(nn.Module):
    """GQA with optional per-head q/k RMSNorm before RoPE; checkpoint q/k/v_proj (packed here), o_proj."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        qk_norm_eps: float | None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias)
        self.o_proj = ReplicatedLinear(num_heads * head_dim, hidden_size, bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.scale = head_dim**-0.5

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, H] -> rotated q [B, n, heads, d], rotated k and v [B, n, kv_heads, d]; cos/sin [n, d]."""
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return (
            apply_rotary(q, cos, sin),
            apply_rotary(k, cos, sin),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """q [B, n, heads, d] over keys/values [B, m, kv_heads, d]; visible [n, m] or [B, n, m] bool -> [B, n,
        H]."""
        if visible.dim() == 2:
            visible = visible.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=visible.unsqueeze(1),
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))
