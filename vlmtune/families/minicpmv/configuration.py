"""The flat ``minicpmv`` config of MiniCPM-V 2.6 / 4.0 / 4.5 checkpoints in the released remote-code layout.

Facts come from the published ``configuration_minicpm.py`` of openbmb/MiniCPM-V-2_6 and MiniCPM-V-4_5, and from
vLLM's ``minicpmv.py`` (which LLM each ``version`` uses).
"""

from __future__ import annotations

import logging

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

logger = logging.getLogger(__name__)

# vLLM's dispatch on `config.version`: 2.6 → Qwen2-7B, 4.0 → MiniCPM4 (a Llama layout), 4.5 → Qwen3-8B.
LLM_TYPE_BY_VERSION = {"2.6": "qwen2", "4.0": "llama", "4.5": "qwen3"}
LLM_CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1152,
    "image_size": 980,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
}
# Top-level keys that describe the vision side, the file or the whole model's loading, never the LLM.
_NON_LLM_KEYS = {
    "model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "vision_config",
    "slice_config", "slice_mode", "query_num", "image_size", "patch_size", "use_image_id",
    "batch_vision_input", "batch_3d_resampler", "vision_batch_size", "drop_vision_last_layer", "version",
    "llm_model_type", "quantization_config",
}  # fmt: skip


class MiniCPMVConfig(PretrainedConfig):
    """The flat `minicpmv` config of the released checkpoints.

    Args:
        version: 2.6, 4.0 or 4.5; picks the LLM class when `llm_model_type` is not given.
        llm_model_type: "qwen2", "qwen3" or "llama"; the class of `llm`, built from the top-level fields.
        vision_config: SigLIP vision fields (dict or `SiglipVisionConfig`); defaults to so400m-patch14-980.
        query_num: resampler queries, i.e. tokens per view (64).
        image_size: nominal view size in pixels (448).
        patch_size: vision patch size; always taken from `vision_config` (as the remote code does).
        slice_mode: whether images are sliced; `False` serves each image as one view.
        slice_config: `{"max_slice_nums", "scale_resolution", "patch_size"}`; also readable as the
            `max_slice_nums` (9) and `scale_resolution` (448) properties.
        use_image_id: whether placeholders start with `<image_id>i</image_id>`.
        batch_vision_input: kept for the remote code; views are always batched here.
        vision_batch_size: views per vision-tower call (bounds peak memory, not results).
        drop_vision_last_layer: build `num_hidden_layers - 1` vision layers; the remote code defaults it to
            True, the released 2.6 / 4.5 config files set it explicitly.
        **kwargs: the LLM's fields (hidden_size, num_hidden_layers, rope_theta, vocab_size, ...), kept flat.
    """

    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        version: float = 2.6,
        llm_model_type: str | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        query_num: int = 64,
        image_size: int = 448,
        patch_size: int | None = None,
        slice_mode: bool = True,
        slice_config: dict | None = None,
        use_image_id: bool = True,
        batch_vision_input: bool = True,
        vision_batch_size: int = 16,
        drop_vision_last_layer: bool = True,
        **kwargs,
    ):
        if llm_model_type is None:
            llm_model_type = LLM_TYPE_BY_VERSION.get(f"{float(version):.1f}")
        if llm_model_type not in LLM_CONFIGS:
            raise ValueError(
                f"MiniCPM-V version {version!r} with llm_model_type={llm_model_type!r} is not supported; "
                f"pass llm_model_type as one of {sorted(LLM_CONFIGS)} (2.6: qwen2, 4.0: llama, 4.5: qwen3)"
            )
        if isinstance(vision_config, SiglipVisionConfig):
            vision_config = vision_config.to_dict()
        vision_fields = {**DEFAULT_VISION_CONFIG, **(vision_config or {})}
        vision_fields.pop("model_type", None)
        vision_fields.pop("transformers_version", None)
        self.version = version
        self.llm_model_type = llm_model_type
        self.vision_config = SiglipVisionConfig(**vision_fields)
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = self.vision_config.patch_size
        if patch_size is not None and patch_size != self.patch_size:
            logger.warning("patch_size=%s ignored: vision_config.patch_size=%s wins", patch_size, self.patch_size)
        self.slice_mode = slice_mode
        # Released 4.5 files omit scale_resolution; the published slice config defaults it to 448.
        self.slice_config = {"max_slice_nums": 9, "scale_resolution": 448, **(slice_config or {})}
        self.slice_config["patch_size"] = self.patch_size
        self.use_image_id = use_image_id
        self.batch_vision_input = batch_vision_input
        self.vision_batch_size = vision_batch_size
        self.drop_vision_last_layer = drop_vision_last_layer
        # Top-level duplicates of slice fields would shadow the properties below; slice_config is the record.
        for key in ("max_slice_nums", "scale_resolution"):
            if key in kwargs:
                self.slice_config[key] = kwargs.pop(key)
        super().__init__(**kwargs)

    @property
    def max_slice_nums(self) -> int:
        return self.slice_config["max_slice_nums"]

    @max_slice_nums.setter
    def max_slice_nums(self, value: int) -> None:
        self.slice_config["max_slice_nums"] = value

    @property
    def scale_resolution(self) -> int:
        return self.slice_config["scale_resolution"]

    @scale_resolution.setter
    def scale_resolution(self, value: int) -> None:
        self.slice_config["scale_resolution"] = value

    def to_dict(self) -> dict:
        # Only the vision fields that differ from SigLIP defaults, like the released files.
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_diff_dict()
        return output

    def llm_config(self) -> PretrainedConfig:
        """The `llm` sub-model's config, built from the flat top-level fields (unknown keys pass through)."""
        config_class = LLM_CONFIGS[self.llm_model_type]
        fields = {k: v for k, v in self.to_dict().items() if k not in _NON_LLM_KEYS}
        return config_class(**fields)
