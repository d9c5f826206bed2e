"""MiniCPM-V's vision side in the released layout: the SigLIP NaViT encoder (``vpm``) over variable-size views and
the one-layer perceiver resampler (``resampler``) with 2-D sin-cos positions; parameter names as released.

Facts come from the published remote code (``modeling_navit_siglip.py`` and ``resampler.py`` of
openbmb/MiniCPM-V-2_6 and MiniCPM-V-4_5).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

# ----------------------------------------------------------------------------------------------- vision tower


@lru_cache(maxsize=4096)
def navit_position_ids(height: int, width: int, num_patches_per_side: int) -> torch.Tensor:
    """Position-embedding ids of an `height × width` patch grid on a `num_patches_per_side`² table.

    NaViT fractional coordinates as in `modeling_navit_siglip.py`: patch `i` of `n` sits at `i / n` in [0, 1),
    bucketised on the table's `1 / side` boundaries, so any grid reuses the 70×70 table of the 980-px encoder.
    The arithmetic (float32 steps, `right=True`) is the published one so bucket edges land identically.
    """
    side = num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(height)), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(width)), boundaries, right=True)
    return (rows[:, None] * side + cols).flatten()


class MiniCPMVVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """`(N, 3, patch, L * patch)` strips → `(N, L, hidden)`; padding patches get position 0 (masked)."""
        embeds = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position_ids = torch.zeros(embeds.shape[:2], dtype=torch.long)
        for i, (height, width) in enumerate(tgt_sizes):
            position_ids[i, : height * width] = navit_position_ids(height, width, self.num_patches_per_side)
        return embeds + self.position_embedding(position_ids.to(embeds.device))


class MiniCPMVVisionAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj, self.k_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v_proj, self.out_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        query, key, value = (
            heads(self.q_proj(hidden_states)),
            heads(self.k_proj(hidden_states)),
            heads(self.v_proj(hidden_states)),
        )
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class MiniCPMVVisionMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MiniCPMVVisionLayer(GradientCheckpointingLayer):
    """Pre-norm SigLIP block; `GradientCheckpointingLayer` gives it the transformers checkpointing switch."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MiniCPMVVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MiniCPMVVisionMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class MiniCPMVVisionEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(MiniCPMVVisionLayer(config) for _ in range(num_layers))


class MiniCPMVVisionTransformer(nn.Module):
    """`vpm`: SigLIP with per-view patch grids. Views are right-padded strips; padded keys are masked out."""

    def __init__(self, config: SiglipVisionConfig, num_layers: int):
        super().__init__()
        self.embeddings = MiniCPMVVisionEmbeddings(config)
        self.encoder = MiniCPMVVisionEncoder(config, num_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """`(N, 3, patch, L * patch)` strips, `(h, w)` per view → `(N, L, hidden)`; rows past `h * w` pad."""
        hidden_states = self.embeddings(pixel_values, tgt_sizes)
        lengths = torch.tensor([h * w for h, w in tgt_sizes], device=hidden_states.device)
        valid = torch.arange(hidden_states.shape[1], device=hidden_states.device) < lengths[:, None]
        # No mask at all when nothing is padded keeps SDPA on its fastest kernels.
        attention_mask = None if bool(valid.all()) else valid[:, None, None, :]
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states, attention_mask=attention_mask)
        return self.post_layernorm(hidden_states)


# ------------------------------------------------------------------------------------------------- resampler


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of patch coordinates, `(..., dim)` float32.

    As in the published `resampler.py`: the first half encodes the *column* (its meshgrid puts width first),
    the second half the row; each half is `[sin(p * omega), cos(p * omega)]` with
    `omega_k = 10000 ** (-k / (dim / 4))`. Computed on the fly (no cache buffer, so nothing to re-create after
    meta-device loading); the remote code's 70×70 cache grows the same way for larger grids.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter)

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.float()[..., None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([encode(cols), encode(rows)], dim=-1)


class MiniCPMVResamplerAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` parameters (`in_proj_weight`, `in_proj_bias`, `out_proj`) with a forward that
    calls `self.out_proj(...)` (torch's functional path reads its weight directly, which would bypass a LoRA
    on it) and runs SDPA. Batch-first; returns `(output, None)` like `need_weights=False`.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__(embed_dim, num_heads, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        q, k, v = (
            heads(F.linear(query, w_q, b_q)),
            heads(F.linear(key, w_k, b_k)),
            heads(F.linear(value, w_v, b_v)),
        )
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)), None


class MiniCPMVResampler(nn.Module):
    """`resampler`: `query_num` learned queries cross-attend to one view's patches (2-D sin-cos on keys only).

    out = ln_post(attn(ln_q(query), ln_kv(kv_proj(x)) + pos, ln_kv(kv_proj(x)))) @ proj
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = MiniCPMVResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, tgt_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """`(N, L, kv_dim)` vision states, `(h, w)` per view → `(N, query_num, embed_dim)`."""
        length = x.shape[1]
        rows = torch.zeros(len(tgt_sizes), length, dtype=torch.long)
        cols = torch.zeros_like(rows)
        for i, (height, width) in enumerate(tgt_sizes):
            index = torch.arange(height * width)
            rows[i, : height * width], cols[i, : height * width] = index // width, index % width
        lengths = torch.tensor([h * w for h, w in tgt_sizes], device=x.device)
        padding = torch.arange(length, device=x.device) >= lengths[:, None]
        pos = sincos_2d(rows.to(x.device), cols.to(x.device), self.embed_dim).to(x.dtype)
        pos = pos.masked_fill(padding[..., None], 0.0)
        kv = self.ln_kv(self.kv_proj(x))
        query = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(query, kv + pos, kv, key_padding_mask=padding)
        return self.ln_post(out) @ self.proj
