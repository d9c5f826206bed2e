"""Export: adapter + processor + recipe record; plain transformers + peft reload gives the same logits."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune.atomic import OutputWriteError
from vlmtune.data.collator import Collator


def _tied_copies(model):
    modules = dict(model.named_modules())
    head = modules["base_model.model.lm_head.modules_to_save.default"]
    embedding = modules["base_model.model.model.language_model.modules_to_save.default.embed_tokens"]
    return head.weight, embedding.weight


@pytest.mark.parametrize(
    ("family", "towers"),
    [
        ("qwen2_5_vl", dict(language="lora", modules_to_save=["lm_head"])),
        ("gemma3", dict(language="lora", modules_to_save=["lm_head"])),
        # Gemma-3's lm_head is tied to the embedding: a fully trained language tower trains one copy of both.
        ("gemma3", dict(language="full")),
    ],
    ids=["qwen2_5_vl", "gemma3", "gemma3-language-full"],
)
def test_export_reloads_in_plain_peft_with_equal_logits(family, towers, tiny_qwen, tiny_gemma, latex_data, tmp_path):
    path = {"qwen2_5_vl": tiny_qwen, "gemma3": tiny_gemma}[family]
    model, processor, adapter = vlmtune.load(path)
    original = model.get_input_embeddings().weight.detach().clone()
    tuning = vlmtune.TuningConfig(vision="lora", **towers)
    model = vlmtune.apply_tuning(model, adapter, tuning)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, lr=1e-2)
    vlmtune.train(model, processor, adapter, rows, config, tuning)
    if towers["language"] == "full":
        head, embedding = _tied_copies(model)
        assert head is embedding and not torch.equal(embedding, original)  # trained, and still one matrix
    out = vlmtune.export(model, processor, tmp_path / "out", recipe={"tuning": tuning, "training": config})

    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "vlmtune.json", "chat_template.jinja"} <= files
    assert "tokenizer.json" in files and "processor_config.json" in files
    record = json.loads((out / "vlmtune.json").read_text())
    assert record["recipe"]["tuning"]["vision"] == "lora" and record["recipe"]["training"]["max_steps"] == 3
    assert record["versions"]["transformers"] and record["versions"]["peft"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path)

    batch = Collator(adapter, processor, model.config)([{"index": i, "row": rows[i]} for i in range(2)])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    # A separate interpreter that never imports vlmtune: the export must stand on transformers + peft alone.
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
batch = torch.load(sys.argv[1])
base = AutoModelForImageTextToText.from_pretrained({str(path)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
assert "vlmtune" not in sys.modules
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[2])
"""
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")], check=True)
    reloaded = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


def test_merge_writes_a_full_checkpoint_with_the_same_logits(tiny_qwen, latex_data, tmp_path):
    model, processor, adapter = vlmtune.load(tiny_qwen)
    tuning = vlmtune.TuningConfig(vision="frozen")
    model = vlmtune.apply_tuning(model, adapter, tuning)
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    vlmtune.train(model, processor, adapter, rows, vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=2, lr=1e-2))
    out = vlmtune.export(model, processor, tmp_path / "out")
    merged = vlmtune.merge(out, tmp_path / "merged", dtype=torch.float32)

    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    batch = Collator(adapter, processor, model.config)([{"index": 0, "row": rows[0]}])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)
    assert (merged / "chat_template.jinja").exists()


def _full_disk(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_failed_export_leaves_the_previous_one_and_the_users_files(where, tiny_qwen, tmp_path, monkeypatch):
    model, processor, adapter = vlmtune.load(tiny_qwen)
    model = vlmtune.apply_tuning(model, adapter, vlmtune.TuningConfig(vision="frozen"))
    out = vlmtune.export(model, processor, tmp_path / "out")
    (out / "notes.txt").write_text("the user's own")
    checkpoint = out / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "vlmtune_checkpoint.json").write_text('{"files": {}}')  # complete, if empty
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".lora_B." in n).add_(1.0)  # the next export differs

    if where == "writing":

        def fail(self, folder, **kwargs):
            raise _full_disk(Path(folder) / "tokenizer.json")

        monkeypatch.setattr(type(processor), "save_pretrained", fail)
    else:  # the last rename (vlmtune.json) fails: every file already swapped in must be put back
        replace, failed = os.replace, []

        def fail(src, dst):
            if Path(dst).name == "vlmtune.json" and not failed:
                failed.append(dst)
                raise _full_disk(dst)
            replace(src, dst)

        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputWriteError) as caught:
        vlmtune.export(model, processor, out)
    monkeypatch.undo()
    assert re.fullmatch(
        f"could not write the export to {re.escape(str(out))}: \\[Errno 28\\] No space left on device: '.*'; "
        f"its previous files are unchanged; the last good checkpoint is {re.escape(str(checkpoint))}",
        str(caught.value),
    )
    assert caught.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoints"]  # no staging folder left

    vlmtune.export(model, processor, out)  # with room again
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert (out / "notes.txt").read_text() == "the user's own"
