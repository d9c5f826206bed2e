"""The shared trainer: loss falls, LoRA moves, frozen weights stay bit-identical, data errors stop early."""

from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune.data.collator import Collator
from vlmtune.data.schema import DataError
from vlmtune.testing import run_two_processes
from vlmtune.train import find_unused_parameters, make_optimizer

WORKER = Path(__file__).with_name("train_ddp_worker.py")


def _tune(path, **tuning):
    model, processor, adapter = vlmtune.load(path)
    config = vlmtune.TuningConfig(**tuning)
    return vlmtune.apply_tuning(model, adapter, config), processor, adapter, config


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_twenty_steps_lower_the_loss_and_only_lora_changes(family, tiny_qwen, tiny_gemma, latex_data, tmp_path):
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    model, processor, adapter, tuning = _tune(path, vision="lora", language="lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=20, batch_size=4, lr=5e-3, logging_steps=1)
    result = vlmtune.train(model, processor, adapter, rows, config, tuning)

    assert len(result.losses) == 20
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, _ in model.named_parameters() if ".lora_B." in n}
    assert lora <= changed  # every LoRA B moved from its zero init
    assert all(".lora_" in n for n in changed)  # and nothing else did, bit for bit


def test_qlora_trains_on_cpu(tiny_qwen, latex_data, tmp_path):
    model, processor, adapter = vlmtune.load(tiny_qwen, quant="nf4")
    tuning = vlmtune.TuningConfig(vision="frozen")
    model = vlmtune.apply_tuning(model, adapter, tuning)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=2, lr=5e-3, logging_steps=1)
    result = vlmtune.train(model, processor, adapter, rows, config, tuning)
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_a_bad_row_stops_the_run_before_any_step(tiny_qwen, tmp_path):
    model, processor, adapter, tuning = _tune(tiny_qwen)
    good = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x^2"}]},
        ],
        "images": [str(tmp_path / "missing.png")],
    }
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=1)
    with pytest.raises(DataError, match=r"row 0: image file .*missing\.png' not found"):
        vlmtune.train(model, processor, adapter, [good], config, tuning)


def test_resume_from_checkpoint_is_a_deprecated_name_of_resume():
    with pytest.warns(FutureWarning, match="use resume"):
        config = vlmtune.TrainConfig(resume_from_checkpoint=True)
    assert config.resume is True
    assert vlmtune.TrainConfig(resume=Path("out/checkpoints/checkpoint-4")).resume == "out/checkpoints/checkpoint-4"
    with pytest.raises(ValueError, match="set only resume"):
        vlmtune.TrainConfig(resume=True, resume_from_checkpoint="out/checkpoints/checkpoint-4")
    with pytest.raises(ValueError, match="save_total_limit must be >= 1"):
        vlmtune.TrainConfig(save_total_limit=0)


def test_tower_learning_rates_make_optimizer_groups(tiny_qwen):
    model, _, adapter, tuning = _tune(tiny_qwen, vision="lora", vision_lr=1e-5, language_lr=3e-4)
    optimizer = make_optimizer(model, adapter, tuning, vlmtune.TrainConfig(lr=1e-4))
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"vision": 1e-5, "language": 3e-4}
    vision = {id(p) for g in optimizer.param_groups if g["name"] == "vision" for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in vision}
    assert names and all(".visual.blocks." in n and ".lora_" in n for n in names)


def test_train_uses_the_tower_learning_rates_the_model_was_built_with(tiny_qwen, latex_data, tmp_path, monkeypatch):
    model, processor, adapter, tuning = _tune(tiny_qwen, vision="lora", vision_lr=1e-5, language_lr=3e-4)
    assert vlmtune.tuning.tuning_of(model) is tuning
    seen = {}
    real = vlmtune.train.__globals__["make_optimizer"]

    def recording(model, adapter, tuning, config):
        optimizer = real(model, adapter, tuning, config)
        seen.update({g["name"]: g["lr"] for g in optimizer.param_groups})
        return optimizer

    monkeypatch.setitem(vlmtune.train.__globals__, "make_optimizer", recording)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, lr=1e-4)
    vlmtune.train(model, processor, adapter, rows, config)  # no tuning passed: the model's own
    assert seen == {"vision": 1e-5, "language": 3e-4}


def test_optimizer_state_only_for_trainable_parameters(tiny_gemma, latex_data, tmp_path):
    model, processor, adapter, tuning = _tune(tiny_gemma, vision="frozen", language="lora", mlp=False)
    optimizer = make_optimizer(model, adapter, tuning, vlmtune.TrainConfig(lr=1e-3))
    collator = Collator(adapter, processor, model.config)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    batch = collator([{"index": i, "row": rows[i]} for i in range(2)])
    model(**batch).loss.backward()
    optimizer.step()
    with_state = {n for n, p in model.named_parameters() if p in optimizer.state}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_state == expected
    assert all("language_model" in n and "self_attn" in n and ".lora_" in n for n in with_state)
    assert len(with_state) == 2 * 4 * 2  # 2 layers x q/k/v/o x (A, B)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_packed_training_runs_and_lowers_the_loss(family, tiny_qwen, tiny_gemma, latex_data, tmp_path):
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    model, processor, adapter, tuning = _tune(path)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(
        output_dir=str(tmp_path), max_steps=8, lr=5e-3, logging_steps=1, packing=True, max_length=600
    )
    result = vlmtune.train(model, processor, adapter, rows, config, tuning)
    assert result.kept_rows == len(rows)
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]


def test_dataloader_workers_decode_images_in_subprocesses(tiny_qwen, latex_data, tmp_path):
    model, processor, adapter, tuning = _tune(tiny_qwen, vision="frozen")
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(
        output_dir=str(tmp_path), max_steps=4, batch_size=2, lr=5e-3, logging_steps=1, dataloader_workers=2
    )
    result = vlmtune.train(model, processor, adapter, rows, config, tuning)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize(
    ("tuning", "expected"),
    [
        (dict(vision="frozen", language="lora"), False),
        (dict(vision="lora", language="lora"), True),
        (dict(vision="frozen", language="lora", projector="full"), True),
        (dict(vision="lora", language="frozen"), True),
    ],
)
def test_ddp_looks_for_unused_parameters_only_when_a_tower_can_be_skipped(tiny_qwen, tuning, expected):
    model, _, adapter, config = _tune(tiny_qwen, **tuning)
    assert find_unused_parameters(model, adapter, config) is expected


def test_two_process_training_with_a_text_only_rank(tiny_qwen, tmp_path):
    # Rank 0 sees only text-only rows, rank 1 only image rows (tests/train_ddp_worker.py): rank 0 never runs the
    # vision tower. Without find_unused_parameters DDP waits forever at the first step; a hang fails here.
    run_two_processes(str(WORKER), ["--model", str(tiny_qwen), "--out", str(tmp_path), "--steps", "3"], timeout=150)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    names = sorted(ranks[0]["after"])
    assert len(names) == 2 * 5 * 2  # 2 vision blocks x (qkv, proj, gate, up, down) x (A, B)
    assert len(ranks[0]["losses"]) == 3 and ranks[0]["losses"] == ranks[1]["losses"]  # averaged over ranks
    for name in names:
        assert torch.equal(ranks[0]["after"][name], ranks[1]["after"][name]), name
        assert not torch.equal(ranks[0]["after"][name], ranks[0]["before"][name]), name


def test_held_out_rows_are_checked_and_their_loss_evaluated(tiny_qwen, latex_data, tmp_path):
    model, processor, adapter, tuning = _tune(tiny_qwen, vision="frozen")
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    held_out = list(vlmtune.load_rows("latex_ocr", split="test", path=latex_data))
    held_out.insert(1, {**held_out[0], "images": [str(tmp_path / "gone.png")]})
    config = vlmtune.TrainConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=2,
        eval_rows=held_out,
        eval_steps=1,
        eval_samples=0,
        on_bad_row="skip",
        logging_steps=1,
    )
    result = vlmtune.train(model, processor, adapter, rows, config, tuning)
    assert result.kept_eval_rows == len(held_out) - 1 and result.skipped_eval_rows == {"missing image": 1}
    assert [e["step"] for e in result.evaluations] == [0, 1, 2]
    assert result.metrics["eval_loss"] > 0 and len(result.losses) == 2
    assert '"row": 1, "kind": "missing image"' in (tmp_path / "bad_eval_rows.jsonl").read_text()
    assert not (tmp_path / "bad_rows.jsonl").exists()


def test_trainer_args_pass_through_and_conflicts_are_refused():
    from vlmtune.training_args import training_arguments

    config = vlmtune.TrainConfig(trainer_args={"torch_empty_cache_steps": 3, "lr_scheduler_kwargs": {"power": 2.0}})
    args = training_arguments(config, torch.float32, find_unused=False)
    assert args.torch_empty_cache_steps == 3 and args.lr_scheduler_kwargs == {"power": 2.0}
    with pytest.raises(ValueError, match=r"trainer_args\['learning_rate'\] conflicts .*set TrainConfig.lr instead"):
        vlmtune.TrainConfig(trainer_args={"learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"trainer_args\['bf16'\] conflicts .*chooses it from the device"):
        vlmtune.TrainConfig(trainer_args={"bf16": True})
    with pytest.raises(ValueError, match=r"trainer_args \['learning_rat'\] are not fields of"):
        vlmtune.TrainConfig(trainer_args={"learning_rat": 1e-3})
