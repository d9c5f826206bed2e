"""MiniCPM-V 2.6 / 4.0 / 4.5 in the released remote-code layout, without `trust_remote_code`.

A user's local `openbmb/MiniCPM-V-2_6` (or 4.x) folder has `model_type: "minicpmv"`, a flat config (the LLM's
fields at the top level plus `vision_config`, `query_num`, `slice_config`, `version`) and weights named
`vpm.*` (a SigLIP-so400m NaViT encoder), `resampler.*` (a one-layer perceiver resampler, 64 queries) and
`llm.*` (a `transformers` causal LM). This module rebuilds exactly those parameter names so `from_pretrained`
reads the released safetensors and `save_pretrained` writes files the remote code can read back.

Facts come from the published remote code (`modeling_minicpmv.py`, `modeling_navit_siglip.py`,
`resampler.py`, `configuration_minicpm.py` of openbmb/MiniCPM-V-2_6 and MiniCPM-V-4_5) and from vLLM's
`minicpmv.py` (which LLM each `version` uses).

Batch layout (what the collator must produce):
    input_ids, attention_mask, labels: `(B, T)`; labels follow the Hugging Face convention (aligned with
        input_ids, shifted inside the loss) and are -100 on placeholders.
    pixel_values: every view (source + slices) of every image of the batch, sample-major in the order their
        placeholders appear. Either a list of `(3, patch, L_i * patch)` strips (or a list of such lists, one
        per sample, as the remote code takes them), or one zero-padded `(N, 3, patch, L_max * patch)` tensor.
        A strip is `vlmtune.families.minicpmv.image.reshape_by_patch` of a view: its `L_i = h_i * w_i` patches
        side by side.
    tgt_sizes: `(N, 2)` LongTensor of `(h_i, w_i)` patches per view (or a list of per-sample `(n_b, 2)`
    tensors). image_bound: one `(k_b, 2)` LongTensor per sample of `[start, end)` placeholder ranges, each
        `query_num` long; `sum(k_b) == N`.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vlmtune.families.minicpmv.configuration import MiniCPMVConfig

logger = logging.getLogger(__name__)

# The class of `llm` per `llm_model_type` (see `configuration.LLM_TYPE_BY_VERSION`).
LLM_MODELS = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}


def register() -> None:
    """Make `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` resolve `model_type: "minicpmv"` to this file.

    Only when nothing owns "minicpmv" yet: registering over an existing entry would shadow a native
    implementation in a future `transformers` (native MiniCPM-V 4.6 is `minicpmv4_6`, a different key that
    this never touches). A released folder's `auto_map` is then ignored without `trust_remote_code`, because
    the model type is known locally. AutoModelForCausalLM follows the released `auto_map`, which lists it.
    """
    if "minicpmv" in CONFIG_MAPPING:
        if CONFIG_MAPPING["minicpmv"] is not MiniCPMVConfig:
            logger.info("model_type 'minicpmv' is already registered by %s; leaving it", CONFIG_MAPPING["minicpmv"])
        return
    AutoConfig.register("minicpmv", MiniCPMVConfig)
    AutoModel.register(MiniCPMVConfig, MiniCPMV)
    AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV)


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


# ----------------------------------------------------------------------------------------------------- model


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class MiniCPMV(PreTrainedModel, GenerationMixin):
    """MiniCPM-V (remote-code layout): `vpm` → `resampler` → placeholders of `llm`'s input embeddings.

    A tower with no trainable parameter runs under `no_grad` (no activations kept, no backward through it).
    """

    config_class = MiniCPMVConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["MiniCPMVVisionLayer", "MiniCPMVResampler"]

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        vision = config.vision_config
        num_layers = vision.num_hidden_layers - int(config.drop_vision_last_layer)
        self.vpm = MiniCPMVVisionTransformer(vision, num_layers)
        llm_config = config.llm_config()
        llm_config._attn_implementation = config._attn_implementation
        self.llm = LLM_MODELS[config.llm_model_type](llm_config)
        # The remote code uses hidden // 128 heads; at least one so tiny test models stay buildable.
        num_heads = max(1, llm_config.hidden_size // 128)
        self.resampler = MiniCPMVResampler(config.query_num, llm_config.hidden_size, num_heads, vision.hidden_size)
        self.generation_config = self.llm.generation_config
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniCPMVResampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """`(N, 3, patch, W)` strips, `(N, 2)` patch grids → `(N, query_num, hidden)` in the vision dtype."""
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        patch = self.config.patch_size
        max_len = max(h * w for h, w in sizes)
        if pixel_values.shape[-1] < max_len * patch:
            raise ValueError(
                f"pixel_values strips are {pixel_values.shape[-1]} px wide; tgt_sizes needs {max_len * patch}"
            )
        strips = pixel_values[..., : max_len * patch].to(self.vpm.embeddings.patch_embedding.weight.dtype)
        step = self.config.vision_batch_size
        with torch.set_grad_enabled(torch.is_grad_enabled() and _has_trainable(self.vpm)):
            hidden = torch.cat(
                [self.vpm(strips[i : i + step], sizes[i : i + step]) for i in range(0, len(sizes), step)]
            )
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and (hidden.requires_grad or _has_trainable(self.resampler))
        ):
            return self.resampler(hidden, sizes)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: list | torch.Tensor | None = None,
        tgt_sizes: torch.Tensor | list | None = None,
        image_bound: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings `(B, T, hidden)`, each placeholder range replaced by its view's features."""
        embeds = self.get_input_embeddings()(input_ids)
        scale_emb = getattr(self.config, "scale_emb", None)  # MiniCPM-LLM muP configs; absent for Qwen/Llama
        if scale_emb is not None:
            embeds = embeds * scale_emb
        strips, sizes = _stack_views(pixel_values, tgt_sizes, self.config.patch_size)
        rows, cols = _placeholder_positions(image_bound, input_ids.shape, self.config.query_num, len(sizes))
        if strips is None:
            if self.training and (_has_trainable(self.vpm) or _has_trainable(self.resampler)):
                # A text-only batch still touches every vision parameter so DDP/ZeRO see a gradient for each.
                dummy = embeds.new_zeros(1, 3, self.config.patch_size, 4 * self.config.patch_size)
                features = self.get_image_features(dummy, torch.tensor([[2, 2]]))
                embeds = embeds + 0.0 * features.sum().to(embeds.dtype)
            return embeds
        features = self.get_image_features(strips.to(embeds.device), sizes)
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds.index_put((rows.to(embeds.device), cols.to(embeds.device)), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list | torch.Tensor | None = None,
        tgt_sizes: torch.Tensor | list | None = None,
        image_bound: list[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Causal-LM forward: the `llm`'s output (loss when `labels` are given); batch layout above."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, tgt_sizes, image_bound)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.llm.prepare_inputs_for_generation(*args, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list | torch.Tensor | None = None,
        tgt_sizes: torch.Tensor | list | None = None,
        image_bound: list[torch.Tensor] | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Embed the prompt once (images included), decode with `llm.generate`; returns prompt + new ids."""
        embeds = self.embed_inputs(input_ids, pixel_values, tgt_sizes, image_bound)
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        return self.llm.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )


def _stack_views(
    pixel_values: list | torch.Tensor | None, tgt_sizes: torch.Tensor | list | None, patch_size: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Normalise the accepted pixel layouts to one padded `(N, 3, patch, W)` tensor and `(N, 2)` tgt_sizes."""
    if isinstance(pixel_values, torch.Tensor):
        strips = pixel_values if pixel_values.numel() else None
    else:
        flat = [v for item in pixel_values or [] for v in (item if isinstance(item, (list, tuple)) else [item])]
        strips = None
        if flat:
            strips = flat[0].new_zeros(len(flat), 3, patch_size, max(v.shape[-1] for v in flat))
            for i, view in enumerate(flat):
                strips[i, ..., : view.shape[-1]] = view
    if isinstance(tgt_sizes, (list, tuple)):
        parts = [torch.as_tensor(t).reshape(-1, 2) for t in tgt_sizes]
        tgt_sizes = torch.cat(parts) if parts else None
    sizes = torch.zeros(0, 2, dtype=torch.long) if tgt_sizes is None else tgt_sizes.reshape(-1, 2).long().cpu()
    count = 0 if strips is None else strips.shape[0]
    if count != len(sizes):
        raise ValueError(f"pixel_values holds {count} views but tgt_sizes has {len(sizes)} rows; they must match")
    if strips is not None and strips.shape[1:3] != (3, patch_size):
        raise ValueError(
            f"pixel_values views must be (3, {patch_size}, L * {patch_size}) strips: {tuple(strips.shape)}"
        )
    return strips, sizes


def _placeholder_positions(
    image_bound: list | None, shape: torch.Size, query_num: int, num_views: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (sample, position) indices of every placeholder token, view after view; checks every range."""
    batch, seq_len = shape
    bounds = list(image_bound) if image_bound is not None else [[] for _ in range(batch)]
    if len(bounds) != batch:
        raise ValueError(f"image_bound has {len(bounds)} entries for a batch of {batch}; give one per sample")
    rows, cols = [], []
    for sample, ranges in enumerate(bounds):
        for start, end in torch.as_tensor(ranges, dtype=torch.long).reshape(-1, 2).tolist():
            if end - start != query_num or start < 0 or end > seq_len:
                raise ValueError(
                    f"sample {sample}: image range [{start}, {end}) must hold query_num={query_num} tokens "
                    f"inside the sequence of {seq_len}; was the placeholder truncated?"
                )
            rows.append(torch.full((query_num,), sample))
            cols.append(torch.arange(start, end))
    if len(rows) != num_views:
        raise ValueError(f"image_bound marks {len(rows)} image ranges but pixel_values holds {num_views} views")
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(rows), torch.cat(cols)
