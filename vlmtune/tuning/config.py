"""Which towers train and how: :class:`TuningConfig` and translators of other tools' flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Mode = Literal["frozen", "lora", "full"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass
class TuningConfig:
    """Which towers train and how.

    Attributes:
        vision: mode of the vision tower: ``"frozen"``, ``"lora"`` or ``"full"``.
        projector: mode of the vision→language projector (``"frozen"`` by default: it never gets LoRA by
            accident; ``"full"`` trains and exports it, ``"lora"`` only where the family tags projector linears,
            and not inside a ``"full"`` vision tower that contains it, as Qwen-VL's does: that is refused).
        language: mode of the language tower.
        attention: LoRA on attention projections.
        mlp: LoRA on MLP projections.
        last_n_layers: LoRA only in the last N layers of each LoRA'd tower (``None``: all layers).
        r: LoRA rank.
        alpha: LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``).
        dropout: LoRA dropout.
        use_rslora: rank-stabilised scaling.
        modules_to_save: extra modules trained in full and exported (e.g. ``["lm_head", "embed_tokens"]``).
        gradient_checkpointing: recompute activations in backward (language tower and vision tower alike, as
            transformers applies it model-wide); saves memory at ~30% more compute.
        vision_checkpointing: also checkpoint the vision tower's layers (with ``gradient_checkpointing``). On by
            default: with vision LoRA the vision tower's activations are a large share of a step's memory; turn it
            off to trade that memory for the vision tower's recomputation. ``"attention"``: checkpoint them but
            keep each layer's attention output (``scaled_dot_product_attention``'s), so the recomputation skips
            the attention (Gemma-3-4B, batch 8: 27 x 77 MB more, for a fifth of the vision tower's forward).
        vision_micro_batch: images per pass of the vision tower, for families whose tower takes a batch of whole
            images (Gemma-3's SigLIP; the family's ``vision_takes_image_batch``): the tower runs chunk after
            chunk and the features are concatenated, the same numbers with one chunk's activations alive at a
            time (with checkpointing, backward recomputes one chunk's layer at a time). ``None`` (default) runs
            all images at once. Part of the lean-memory setting with ``offload_activations``
            (``vlmtune_qlora_kernels_offload`` in BENCHMARKS.md: less memory for a slower step).
        embeddings_on_cpu: keep the input embedding matrix in CPU memory when it is frozen, not tied to
            ``lm_head`` and the model sits on a GPU: each forward looks its token rows up on the CPU and copies
            them to the GPU (the same numbers; saves vocab x hidden of GPU memory, 1.0 GiB on Qwen2.5-VL-7B,
            for one small host copy per forward). Skipped under torch.distributed, where DDP broadcasts every
            weight from the GPU.
        offload_activations: keep the tensors saved for backward (with checkpointing: each layer's input) in
            pinned CPU memory instead of GPU memory, for long sequences; same numbers. On CUDA the copies run on a
            side stream beside the compute, and backward fetches each input one layer ahead.
        lora_dtype: ``"float32"`` (default: PEFT keeps the small adapter in fp32, so Adam's updates to it are
            not rounded to bf16 — a few MB for a large memory-free accuracy win) or ``"compute"`` (the model's
            compute dtype, e.g. bf16).
        init_seed: seed of the LoRA initialisation (drawn in a forked RNG, so the same config gives the same
            adapter whatever ran before, and the global RNG is left as it was).
        vision_lr / projector_lr / language_lr: learning rate of that tower's trainable parameters (``None``:
            the run's ``lr``). Parameters outside the towers (``lm_head`` in modules_to_save ...) use the
            language rate.
    """

    vision: Mode = "lora"
    projector: Mode = "frozen"
    language: Mode = "lora"
    attention: bool = True
    mlp: bool = True
    last_n_layers: int | None = None
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = True
    vision_checkpointing: bool | str = True
    vision_micro_batch: int | None = None
    embeddings_on_cpu: bool = True
    offload_activations: bool = False
    lora_dtype: Literal["float32", "compute"] = "float32"
    init_seed: int = 0
    vision_lr: float | None = None
    projector_lr: float | None = None
    language_lr: float | None = None

    def __post_init__(self) -> None:
        for tower in ("vision", "projector", "language"):
            if getattr(self, tower) not in MODES:
                raise ValueError(f"{tower} must be one of {MODES}, got {getattr(self, tower)!r}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.last_n_layers is not None and self.last_n_layers < 1:
            raise ValueError(f"last_n_layers must be >= 1 or None, got {self.last_n_layers}")
        if self.vision_checkpointing not in (True, False, "attention"):
            raise ValueError(
                f"vision_checkpointing must be True, False or 'attention', got {self.vision_checkpointing!r}"
            )
        if self.vision_micro_batch is not None and self.vision_micro_batch < 1:
            raise ValueError(f"vision_micro_batch must be >= 1 or None, got {self.vision_micro_batch}")
        if self.lora_dtype not in ("float32", "compute"):
            raise ValueError(f"lora_dtype must be 'float32' or 'compute', got {self.lora_dtype!r}")
        for name in ("vision_lr", "projector_lr", "language_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        lora_towers = [t for t in ("vision", "language") if getattr(self, t) == "lora"]
        if lora_towers and not (self.attention or self.mlp):
            raise ValueError(f"{lora_towers} set to 'lora' but attention and mlp are both off; turn one on")

    @classmethod
    def from_unsloth(
        cls,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        **kwargs,
    ) -> TuningConfig:
        """Unsloth's ``FastVisionModel.get_peft_model`` flags, meaning the same thing here.

        ``finetune_vision_layers`` / ``finetune_language_layers`` put LoRA on (or leave frozen) the vision /
        language tower; the attention / MLP flags choose the projections. Unlike Unsloth's name regex, the
        projector (Qwen-VL's ``merger.mlp``) never gets LoRA from these flags, and a frozen vision tower also
        runs without a backward pass. Other keyword arguments go to :class:`TuningConfig` (``r``, ...);
        Unsloth's ``lora_alpha`` / ``lora_dropout`` names are accepted.
        """
        renames = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
        kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
        return cls(
            vision="lora" if finetune_vision_layers else "frozen",
            language="lora" if finetune_language_layers else "frozen",
            attention=finetune_attention_modules,
            mlp=finetune_mlp_modules,
            **kwargs,
        )

    @classmethod
    def from_minicpmv(
        cls, tune_vision: bool = True, tune_llm: bool = False, use_lora: bool = True, **kwargs
    ) -> TuningConfig:
        """MiniCPM-V's ``finetune.py`` flags, meaning the same thing here on every family.

        As in OpenBMB's script, the projector (MiniCPM-V's resampler) always trains in full;
        ``tune_vision`` trains the vision tower in full; ``use_lora`` puts LoRA on the language tower (attention
        and MLP here; the script's default regex takes q/k/v only: pass ``mlp=False`` for that), and without
        LoRA ``tune_llm`` would train it in full. A run without any LoRA is plain full fine-tuning, which
        vlmtune does not export as an adapter, so ``use_lora=False`` is refused with that explanation.
        """
        if not use_lora:
            raise ValueError(
                "use_lora=False is full fine-tuning, which vlmtune does not do; use use_lora=True "
                f"(tune_llm={tune_llm} then has no effect: the language tower gets LoRA)"
            )
        return cls(vision="full" if tune_vision else "frozen", projector="full", language="lora", **kwargs)
