"""Export: adapter + processor + recipe record; plain transformers + peft reload gives the same logits."""

import errno
import json
import os
import re
import shutil
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


NATIVE = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "minicpmv4_6"]
FAMILIES = [*NATIVE, "minicpmv"]


def _batch_and_logits(out, latex_data):
    """A one-row batch of the export's family and the logits ``load_exported`` gives for it."""
    model, processor = vlmtune.load_exported(out, dtype=torch.float32, device="cpu")
    family = vlmtune.detect(model.config)
    row = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)[0]
    batch = Collator(family, processor, model.config)([{"index": 0, "row": row}])
    batch.pop("labels")
    with torch.no_grad():
        return batch, model.eval()(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_export_records_an_absolute_base_and_its_model_type(family, random_export):
    out, base = random_export(family)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    record = json.loads((out / "vlmtune.json").read_text())
    assert record["model_type"] == family


def test_native_family_exports_load_with_plain_transformers_and_peft(random_export, latex_data, tmp_path):
    # One interpreter that never imports vlmtune loads every family transformers has classes for, as the README says.
    cases = []
    for family in NATIVE:
        out, base = random_export(family)
        batch, expected = _batch_and_logits(out, latex_data)
        torch.save(batch, tmp_path / f"{family}.pt")
        cases.append((family, str(out), str(base), expected))
    script = """
import sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = Path(sys.argv[1])
for family, out, base in zip(*[iter(sys.argv[2:])] * 3):
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), out)
    AutoProcessor.from_pretrained(out)
    with torch.no_grad():
        torch.save(model.eval()(**torch.load(folder / f"{family}.pt")).logits, folder / f"{family}.logits.pt")
assert "vlmtune" not in sys.modules
"""
    args = [str(tmp_path), *(x for family, out, base, _ in cases for x in (family, out, base))]
    subprocess.run([sys.executable, "-c", script, *args], check=True)
    for family, _, _, expected in cases:
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.logits.pt"), expected, rtol=0, atol=1e-5)


def test_minicpmv_exports_load_with_vlmtunes_model_class_and_peft(random_export, latex_data):
    from peft import PeftModel

    from vlmtune.families.minicpmv.modeling import MiniCPMV
    from vlmtune.families.minicpmv.processing import MiniCPMVProcessor

    out, base = random_export("minicpmv")
    batch, expected = _batch_and_logits(out, latex_data)
    model = PeftModel.from_pretrained(MiniCPMV.from_pretrained(base, dtype=torch.float32), out).eval()
    processor = MiniCPMVProcessor.from_pretrained(out)
    assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<unk>")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)


def test_a_missing_base_is_one_error_naming_it(random_export, tmp_path):
    out, _ = random_export("qwen2_5_vl")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny/qwen2_5_vl"  # relative, as exports once recorded it
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"base model folder 'tiny/qwen2_5_vl' does not exist .*--base"):
        vlmtune.load_exported(moved)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_writes_a_full_checkpoint_with_the_same_logits(family, random_export, latex_data, tmp_path):
    out, _ = random_export(family)
    batch, expected = _batch_and_logits(out, latex_data)
    merged = vlmtune.merge(out, tmp_path / "merged", dtype=torch.float32)
    full, _, detected = vlmtune.load(merged, dtype="float32")
    assert detected.name == vlmtune.detect(full.config).name
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-4)
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


def test_merging_a_released_minicpmv_folder_keeps_its_remote_code_beside_the_config(tiny_minicpmv, tmp_path):
    base = tmp_path / "released"
    shutil.copytree(tiny_minicpmv, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig"}  # as openbmb/MiniCPM-V-2_6 has
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_minicpm.py").write_text("# the released remote code\n")
    model, processor, family = vlmtune.load(base)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    merged = vlmtune.merge(vlmtune.export(model, processor, tmp_path / "out"), tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["auto_map"] == config["auto_map"]
    assert (merged / "configuration_minicpm.py").read_text() == "# the released remote code\n"
