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

import torch
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
)
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vlmtune.families.minicpmv.configuration import MiniCPMVConfig
from vlmtune.families.minicpmv.vision import MiniCPMVResampler, MiniCPMVVisionTransformer

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
