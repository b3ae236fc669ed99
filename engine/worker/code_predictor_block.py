"""The code predictor's whole frame as one fixed-shape block for every voice of a step: the G-1 forwards and
their sampling over static buffers, with the weights fused (q/k norms, gate/up, heads and tables stacked).

Shapes depend only on the batch size: K/V buffers [max_batch, G, kv_heads, d] (rows 0..B-1 used, positions the
mask hides may hold an earlier frame's values), cos/sin and masks computed once, no host read. So the block is
what a CUDA graph captures (code_predictor_graphs.py), and on a CPU it runs about half the ops of
`CodePredictor.predict`, its slow twin, whose codes it reproduces.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.models.code_predictor import CodePredictor, CodePredictorLayer
from omnistream.engine.worker.sampling_draws import mix32, row_keys
from omnistream.engine.worker.speech_sampler import (
    CODE_PREDICTOR_STREAM,
    CODE_PREDICTOR_TEMPERATURE,
    CODE_PREDICTOR_TOP_K,
    CODE_PREDICTOR_TOP_P,
    DRAWS_PER_FRAME,
    SpeechDraws,
    top_candidates,
)


class BlockOutput(NamedTuple):
    codes: torch.Tensor  # [B, G-1] int64: codebooks 1..G-1
    residual_embeds: torch.Tensor  # [B, H]: Σ_g E_cp[g-1](c_g)


def _race(weights: torch.Tensor, keys: torch.Tensor, candidate_hashes: torch.Tensor) -> torch.Tensor:
    """sampling_draws.race at level 0, with the candidates' hashes mix32(2 * id) looked up instead of
    recomputed: the position in [0, N) won by weights [B, N]."""
    bits = mix32(mix32(keys.unsqueeze(1) ^ candidate_hashes))
    uniforms = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
    return (weights / -torch.log(uniforms)).max(dim=-1).indices


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as layers/norm.py computes it (fp32 variance), weight broadcast over the last dims; no casts
    dispatched when x is float32 already (the same values, fewer ops)."""
    if x.dtype == torch.float32:  # torch's rms_norm: these very ops in one call
        return F.rms_norm(x, x.shape[-1:], None, eps) * weight
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _FusedLayer:
    """One decoder layer's weights, fused: qkv as loaded, q_norm/k_norm as one [heads + kv_heads, d] scale,
    gate/up as one matrix."""

    def __init__(self, layer: CodePredictorLayer) -> None:
        attn = layer.self_attn
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale, self.gqa = attn.scale, attn.num_heads != attn.num_kv_heads
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.eps
        self.qkv, self.qkv_bias = attn.qkv_proj.weight, attn.qkv_proj.bias
        self.qk_norm = torch.cat(
            (attn.q_norm.weight.expand(self.heads, -1), attn.k_norm.weight.expand(self.kv_heads, -1))
        ).contiguous()
        self.qk_eps = attn.q_norm.eps
        self.out, self.out_bias = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up = torch.cat((layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)).contiguous()
        self.down = layer.mlp.down_proj.weight

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, n, H] at positions start..start+n-1; keys/values [B, G, kv_heads, d] take theirs."""
        batch, n = x.shape[0], x.shape[1]
        qkv = F.linear(_rms(x, self.input_norm, self.eps), self.qkv, self.qkv_bias)
        qkv = qkv.view(batch, n, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = _rms(qkv[:, :, : self.heads + self.kv_heads], self.qk_norm, self.qk_eps)
        qk = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin  # sin signed: rotate_half(qk) * sin, 1 op
        keys[:, start : start + n] = qk[:, :, self.heads :]
        values[:, start : start + n] = qkv[:, :, self.heads + self.kv_heads :]
        attn = F.scaled_dot_product_attention(
            qk[:, :, : self.heads].transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=visible,
            scale=self.scale,
            enable_gqa=self.gqa,
        )
        x = x + F.linear(attn.transpose(1, 2).flatten(-2), self.out, self.out_bias)
        gate, up = F.linear(_rms(x, self.post_norm, self.eps), self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


class CodePredictorBlock:
    """All G-1 steps of a frame for up to `max_batch` rows; `__call__` may be recorded as one CUDA graph."""

    def __init__(self, predictor: CodePredictor, max_batch: int) -> None:
        config = predictor.config
        weight = predictor.lm_head[0].weight
        self.groups, self.max_batch = config.num_code_groups, max_batch
        self.layers = [_FusedLayer(layer) for layer in predictor.model.layers]
        self.norm, self.norm_eps = predictor.model.norm.weight, predictor.model.norm.eps
        self.heads = torch.stack([head.weight for head in predictor.lm_head])  # [G-1, V, H]
        self.tables = torch.stack([table.weight for table in predictor.model.codec_embedding])  # [G-1, V, H]
        shape = (max_batch, self.groups, config.num_key_value_heads, config.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        positions = torch.arange(self.groups, device=weight.device)
        cos, sin = predictor.model.rotary_emb(positions, weight.dtype)
        # rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2] exactly ((-a) * b == a * (-b))
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [G, 1, d]
        self.visible = torch.ones(self.groups, self.groups, dtype=torch.bool, device=weight.device).tril()
        self.id_hashes = mix32(2 * torch.arange(config.vocab_size, device=weight.device))  # [V]

    @torch.inference_mode()
    def __call__(
        self, hidden: torch.Tensor, c0_embeds: torch.Tensor, draws: SpeechDraws, any_greedy: bool = True
    ) -> BlockOutput:
        """hidden [B, H] (the talker's final-normed state that sampled c0), c0_embeds [B, H] -> codebooks 1..G-1
        drawn as `CodePredictorSampler` draws them (counter frame * DRAWS_PER_FRAME + g); `any_greedy` False
        (every row samples) skips the argmax."""
        batch = hidden.shape[0]
        if batch > self.max_batch:
            raise ValueError(f"the code predictor block holds {self.max_batch} rows, got {batch}")
        steps = self.groups - 1
        counters = draws.frames.unsqueeze(1) * DRAWS_PER_FRAME + torch.arange(1, steps + 1, device=hidden.device)
        keys = row_keys(
            torch.full_like(counters, CODE_PREDICTOR_STREAM),
            draws.seeds.unsqueeze(1).expand_as(counters),
            counters,
        )  # [B, G-1]: every step's draw key at once
        buffers = [(k[:batch], v[:batch]) for k, v in zip(self.keys, self.values)]
        x, start = torch.stack((hidden, c0_embeds), dim=1), 0
        codes, residual = [], torch.zeros_like(hidden)
        for step in range(steps):
            end = start + x.shape[1]
            cos, sin, visible = self.cos[start:end], self.sin[start:end], self.visible[start:end]
            for layer, (layer_keys, layer_values) in zip(self.layers, buffers):
                x = layer(x, cos, sin, layer_keys, layer_values, start, visible)
            logits = F.linear(_rms(x[:, -1], self.norm, self.norm_eps), self.heads[step])
            logits = logits if logits.dtype == torch.float32 else logits.float()
            ids, probs = top_candidates(logits, CODE_PREDICTOR_TEMPERATURE, CODE_PREDICTOR_TOP_K, CODE_PREDICTOR_TOP_P)
            chosen = ids.gather(1, _race(probs, keys[:, step], self.id_hashes[ids]).unsqueeze(1)).squeeze(1)
            if any_greedy:
                chosen = torch.where(draws.do_sample, chosen, logits.argmax(dim=-1))
            row = F.embedding(chosen, self.tables[step])
            residual = residual + row
            codes.append(chosen)
            x, start = row.unsqueeze(1), end
        return BlockOutput(torch.stack(codes, dim=1), residual)
