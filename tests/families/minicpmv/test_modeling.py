"""vlmtune's native MiniCPM-V (remote-code layout): released key names, loading, training forward, generation.

Run: `.venv/bin/python -m pytest tests/families/minicpmv/test_modeling.py -q`
"""

import json
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlmtune.families.minicpmv.configuration import MiniCPMVConfig
from vlmtune.families.minicpmv.image import MiniCPMVImageTokens, image_bound, process_image
from vlmtune.families.minicpmv.modeling import MiniCPMV, register
from vlmtune.families.minicpmv.tiny import tiny_minicpmv_config
from vlmtune.families.minicpmv.vision import navit_position_ids, sincos_2d

# Normalised (layer index → N) keys of the published openbmb/MiniCPM-V-4_5 model.safetensors.index.json.
RELEASED_4_5_KEYS = {
    "llm.lm_head.weight",
    "llm.model.embed_tokens.weight",
    "llm.model.layers.N.input_layernorm.weight",
    "llm.model.layers.N.mlp.down_proj.weight",
    "llm.model.layers.N.mlp.gate_proj.weight",
    "llm.model.layers.N.mlp.up_proj.weight",
    "llm.model.layers.N.post_attention_layernorm.weight",
    "llm.model.layers.N.self_attn.k_norm.weight",
    "llm.model.layers.N.self_attn.k_proj.weight",
    "llm.model.layers.N.self_attn.o_proj.weight",
    "llm.model.layers.N.self_attn.q_norm.weight",
    "llm.model.layers.N.self_attn.q_proj.weight",
    "llm.model.layers.N.self_attn.v_proj.weight",
    "llm.model.norm.weight",
    "resampler.attn.in_proj_bias",
    "resampler.attn.in_proj_weight",
    "resampler.attn.out_proj.bias",
    "resampler.attn.out_proj.weight",
    "resampler.kv_proj.weight",
    "resampler.ln_kv.bias",
    "resampler.ln_kv.weight",
    "resampler.ln_post.bias",
    "resampler.ln_post.weight",
    "resampler.ln_q.bias",
    "resampler.ln_q.weight",
    "resampler.proj",
    "resampler.query",
    "vpm.embeddings.patch_embedding.bias",
    "vpm.embeddings.patch_embedding.weight",
    "vpm.embeddings.position_embedding.weight",
    "vpm.encoder.layers.N.layer_norm1.bias",
    "vpm.encoder.layers.N.layer_norm1.weight",
    "vpm.encoder.layers.N.layer_norm2.bias",
    "vpm.encoder.layers.N.layer_norm2.weight",
    "vpm.encoder.layers.N.mlp.fc1.bias",
    "vpm.encoder.layers.N.mlp.fc1.weight",
    "vpm.encoder.layers.N.mlp.fc2.bias",
    "vpm.encoder.layers.N.mlp.fc2.weight",
    "vpm.encoder.layers.N.self_attn.k_proj.bias",
    "vpm.encoder.layers.N.self_attn.k_proj.weight",
    "vpm.encoder.layers.N.self_attn.out_proj.bias",
    "vpm.encoder.layers.N.self_attn.out_proj.weight",
    "vpm.encoder.layers.N.self_attn.q_proj.bias",
    "vpm.encoder.layers.N.self_attn.q_proj.weight",
    "vpm.encoder.layers.N.self_attn.v_proj.bias",
    "vpm.encoder.layers.N.self_attn.v_proj.weight",
    "vpm.post_layernorm.bias",
    "vpm.post_layernorm.weight",
}
# 2.6 shares vpm/resampler; its Qwen2 LLM has q/k/v biases and no q_norm/k_norm.
RELEASED_2_6_KEYS = {k for k in RELEASED_4_5_KEYS if not re.search(r"(q|k)_norm", k)} | {
    f"llm.model.layers.N.self_attn.{p}_proj.bias" for p in "qkv"
}

TOKENS = MiniCPMVImageTokens()
SPECIAL = [TOKENS.image_start, TOKENS.image_end, TOKENS.slice_start, TOKENS.slice_end, TOKENS.unk]
SPECIAL += [TOKENS.image_id_start, TOKENS.image_id_end]
VOCAB = {token: 3 + i for i, token in enumerate(SPECIAL)}  # 0 pad, 1 bos, 2 eos
VOCAB_SIZE = 160
STARTS = [VOCAB[TOKENS.image_start], VOCAB[TOKENS.slice_start]]
ENDS = [VOCAB[TOKENS.image_end], VOCAB[TOKENS.slice_end]]
# Views of 56 px (4x4 patches) keep the tiny model fast; the slicing logic is the real one.
SLICING = {"scale_resolution": 56, "patch_size": 14}


def tokenize(text: str) -> list[int]:
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL) + ")"
    ids = []
    for piece in re.split(pattern, text):
        ids.extend([VOCAB[piece]] if piece in VOCAB else [20 + ord(c) % 128 for c in piece])
    return ids


def tiny(version: float = 2.6, **overrides) -> MiniCPMVConfig:
    return tiny_minicpmv_config(
        VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0, version=version, **overrides
    )


def normalised_keys(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def make_batch(images: list[Image.Image], answers: list[str]) -> dict:
    """One image per sample; right-padded ids, labels on the answer only, views sample-major."""
    rows, labels, pixel_values, tgt_sizes, bounds = [], [], [], [], []
    for image, answer in zip(images, answers, strict=True):
        views = process_image(image, **SLICING)
        prompt = [1] + tokenize(views["placeholder"] + "\nWhat is it?")
        target = tokenize(answer) + [2]
        ids = torch.tensor(prompt + target)
        rows.append(ids)
        labels.append(torch.tensor([-100] * len(prompt) + target))
        pixel_values.extend(views["pixel_values"])
        tgt_sizes.append(views["tgt_sizes"])
        bounds.append(image_bound(ids, STARTS, ENDS))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    label_ids = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)], label_ids[i, : len(ids)], attention_mask[i, : len(ids)] = ids, lab, 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_ids,
        "pixel_values": pixel_values,
        "tgt_sizes": torch.cat(tgt_sizes),
        "image_bound": bounds,
    }


def released_folder(tmp_path, version: float = 2.6):
    """A folder shaped like a released checkpoint: flat config.json with auto_map, safetensors by key name."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = MiniCPMV(tiny(version))
    config = model.config.to_dict()
    config.update(
        auto_map={
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
        },
        torch_dtype="float32",
    )
    config["slice_config"] = {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}
    config["vision_config"]["model_type"] = "siglip"
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path, state


@pytest.mark.parametrize(("version", "expected"), [(2.6, RELEASED_2_6_KEYS), (4.5, RELEASED_4_5_KEYS)])
def test_state_dict_uses_released_key_names(version, expected):
    model = MiniCPMV(tiny(version))
    keys = model.state_dict().keys()
    assert normalised_keys(keys) == expected
    assert {
        "resampler.attn.in_proj_weight",
        "vpm.embeddings.position_embedding.weight",
        "llm.lm_head.weight",
    } <= set(keys)
    assert {k.split(".")[0] for k in keys} == {"vpm", "resampler", "llm"}


def test_released_config_fields():
    config = tiny()
    assert config.model_type == "minicpmv" and config.llm_model_type == "qwen2"
    assert tiny(4.5).llm_model_type == "qwen3" and MiniCPMVConfig(version=4.0).llm_model_type == "llama"
    assert (config.query_num, config.patch_size, config.max_slice_nums, config.scale_resolution) == (
        64,
        14,
        9,
        448,
    )
    assert MiniCPMVConfig().vision_config.num_hidden_layers == 27
    with pytest.raises(ValueError, match="llm_model_type"):
        MiniCPMVConfig(version=2.5)
    # The remote code's default drops the last SigLIP layer; released files say false explicitly.
    assert len(MiniCPMV(tiny(drop_vision_last_layer=True)).vpm.encoder.layers) == 1


def test_from_pretrained_reads_a_released_layout_folder(tmp_path):
    folder, state = released_folder(tmp_path)
    model = MiniCPMV.from_pretrained(folder)
    assert model.config.scale_resolution == 448  # absent from the 4.5-style slice_config → published default
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_save_pretrained_round_trip_keeps_key_names(tmp_path):
    folder, state = released_folder(tmp_path / "in")
    MiniCPMV.from_pretrained(folder).save_pretrained(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(state)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["architectures"] == ["MiniCPMV"]
    assert config["hidden_size"] == 64 and config["vision_config"]["hidden_size"] == 32  # still flat


def test_register_makes_auto_classes_load_without_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModel

    folder, _ = released_folder(tmp_path)
    register()
    register()  # idempotent
    assert isinstance(AutoConfig.from_pretrained(folder), MiniCPMVConfig)
    assert isinstance(AutoModel.from_pretrained(folder), MiniCPMV)


@pytest.mark.parametrize("version", [2.6, 4.5])
def test_training_forward_two_image_sizes_backward_reaches_every_tower(version):
    torch.manual_seed(0)
    model = MiniCPMV(tiny(version)).train()
    batch = make_batch(
        [Image.new("RGB", (112, 56), (200, 10, 10)), Image.new("RGB", (40, 50), (9, 90, 9))], ["a", "bb"]
    )
    assert len({tuple(s) for s in batch["tgt_sizes"].tolist()}) > 1  # the views differ in grid
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in (
        "vpm.embeddings.patch_embedding.weight",
        "vpm.embeddings.position_embedding.weight",
        "vpm.encoder.layers.0.self_attn.q_proj.weight",
        "resampler.query",
        "resampler.attn.in_proj_weight",
        "resampler.attn.out_proj.weight",
        "llm.model.layers.0.mlp.up_proj.weight",
        "llm.lm_head.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pixel_layouts_agree():
    torch.manual_seed(0)
    model = MiniCPMV(tiny()).eval()
    batch = make_batch([Image.new("RGB", (112, 56), (200, 10, 10)), Image.new("RGB", (40, 50))], ["a", "bb"])
    loss = model(**batch).loss
    views = batch["pixel_values"]
    width = max(v.shape[-1] for v in views)
    padded = torch.zeros(len(views), 3, 14, width)
    for i, view in enumerate(views):
        padded[i, ..., : view.shape[-1]] = view
    per_sample = [views[:3], views[3:]]  # the remote code's list of per-sample lists
    sizes = [batch["tgt_sizes"][:3], batch["tgt_sizes"][3:]]
    assert torch.allclose(model(**{**batch, "pixel_values": padded}).loss, loss)
    assert torch.allclose(model(**{**batch, "pixel_values": per_sample, "tgt_sizes": sizes}).loss, loss)


def test_padding_views_does_not_change_their_features():
    torch.manual_seed(0)
    model = MiniCPMV(tiny()).eval()
    short = process_image(Image.new("RGB", (56, 28), (1, 2, 3)), never_split=True, **SLICING)
    long = process_image(Image.new("RGB", (28, 112), (90, 2, 3)), never_split=True, scale_resolution=112)
    (short_strip,), (long_strip,) = short["pixel_values"], long["pixel_values"]
    assert short_strip.shape[-1] < long_strip.shape[-1]
    alone = model.get_image_features(short_strip[None], short["tgt_sizes"])
    padded = torch.zeros(2, 3, 14, long_strip.shape[-1])
    padded[0, ..., : short_strip.shape[-1]], padded[1] = short_strip, long_strip
    batched = model.get_image_features(padded, torch.cat([short["tgt_sizes"], long["tgt_sizes"]]))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_frozen_towers_run_without_graph():
    model = MiniCPMV(tiny()).train()
    for module in (model.vpm, model.resampler):
        module.requires_grad_(False)
    view = process_image(Image.new("RGB", (56, 56)), **SLICING)
    features = model.get_image_features(view["pixel_values"][0][None], view["tgt_sizes"])
    assert not features.requires_grad


def test_navit_position_ids_bucket_fractional_coordinates():
    # 4x4 table, boundaries 0.25 / 0.5 / 0.75: a 2x2 grid sits at 0 and 0.5 → buckets 0, 2 → ids 0, 2, 8, 10.
    assert navit_position_ids(2, 2, 4).tolist() == [0, 2, 8, 10]
    # 1x8 grid: i / 8 → buckets 0,0,1,1,2,2,3,3 on row 0.
    assert navit_position_ids(1, 8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert navit_position_ids(70, 70, 70).tolist() == list(range(4900))


def test_sincos_2d_first_half_is_the_column():
    dim = 8
    pos = sincos_2d(torch.tensor([0, 3]), torch.tensor([5, 5]), dim)
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    assert torch.allclose(pos[:, :2], torch.sin(5 * omega).expand(2, 2))  # same column → same first half
    assert torch.allclose(pos[1, 4:6], torch.sin(3 * omega)) and torch.allclose(pos[0, 6:], torch.ones(2))


def test_bad_image_bound_names_the_sample():
    model = MiniCPMV(tiny())
    batch = make_batch([Image.new("RGB", (56, 56))], ["a"])
    batch["image_bound"] = [batch["image_bound"][0] + torch.tensor([[0, -1]])]
    with pytest.raises(ValueError, match="sample 0"):
        model(**batch)
    batch = make_batch([Image.new("RGB", (112, 56))], ["a"])
    with pytest.raises(ValueError, match="views"):
        model(**{**batch, "image_bound": [batch["image_bound"][0][:1]]})


def test_greedy_generate_with_images_matches_a_manual_loop():
    torch.manual_seed(0)
    model = MiniCPMV(tiny()).eval()
    batch = make_batch([Image.new("RGB", (112, 56), (200, 10, 10))], [""])
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    embeds = model.embed_inputs(prompt["input_ids"], prompt["pixel_values"], prompt["tgt_sizes"], prompt["image_bound"])
    expected = []
    with torch.no_grad():
        for _ in range(4):
            token = model.llm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            expected.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
    assert out[0, prompt["input_ids"].shape[1] :].tolist() == torch.stack(expected, 1)[0].tolist()


def test_lora_and_gradient_checkpointing():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = MiniCPMV(tiny())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = r"(vpm\.encoder\.layers\.\d+\.self_attn|resampler\.attn|llm\.model\.layers\.\d+\.self_attn)"
    targets += r"\.(q_proj|out_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    peft_model.train()
    batch = make_batch([Image.new("RGB", (112, 56), (200, 10, 10))], ["ab"])
    loss = peft_model(**batch).loss
    loss.backward()
    lora_b = [(n, p) for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert {n.removeprefix("base_model.model.").split(".")[0] for n, _ in lora_b} == {
        "vpm",
        "resampler",
        "llm",
    }
    assert all(p.grad is not None for _, p in lora_b)
    peft_model.eval()
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    assert peft_model.generate(**prompt, max_new_tokens=2, do_sample=False).shape[1] >= prompt["input_ids"].shape[1]
