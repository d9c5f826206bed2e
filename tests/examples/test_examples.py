"""The example scripts run as a user would run them, on the tiny model, so they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script, *args):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_qlora_example_exports_an_adapter(tiny_qwen, latex_data, tmp_path):
    out = _run(
        "qlora_latex_ocr.py",
        "--model",
        str(tiny_qwen),
        "--data",
        str(latex_data),
        "--out",
        str(tmp_path),
        "--steps",
        "5",
    )
    assert "adapter and processor in" in out
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all("visual" not in m for m in config["target_modules"])  # vision frozen: no LoRA there


def test_chat_rows_example_skips_and_counts_bad_rows(tiny_gemma, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (40, 20), "white").save(data / "images" / "a.png")
    good = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A blank page."}]},
        ],
        "images": ["images/a.png"],
    }
    missing = {**good, "images": ["images/missing.png"]}
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [good, good, missing]) + "\n")
    out = _run(
        "chat_rows.py", "--model", str(tiny_gemma), "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2"
    )
    assert "trained on 2 rows, skipped {'missing image': 1}" in out


def test_trl_example_trains_with_vlmtunes_collator_and_its_loss_falls(tiny_qwen, latex_data, tmp_path):
    out = _run(
        "trl_sft.py", "--model", str(tiny_qwen), "--data", str(latex_data), "--out", str(tmp_path), "--steps", "8"
    )
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    first, last = (float(x) for x in line.split()[1:4:2])
    assert last < first - 1.0, line
    assert "over 8 steps" in line
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] and all("visual" not in m for m in config["target_modules"])
