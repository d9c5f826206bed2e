"""Hub ids load through the Hugging Face cache: offline (HF_HUB_OFFLINE=1) from a pre-populated cache, nothing
downloaded; a name in no cache is one error naming it."""

import json
import os
import shutil
import subprocess
import sys

from vlmtune.hub import is_hub_id


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct") and is_hub_id("openbmb/MiniCPM-V-2_6")
    for name in ("./a/b", "/abs/path", "a/b/c", "model", "../a", ".a/b", "a/"):
        assert not is_hub_id(name)


SCRIPT = """
import json, sys
import vlmtune
rows = vlmtune.load_rows(sys.argv[2], split="test")
model, processor, family = vlmtune.load("vlmtune-test/tiny-qwen")
out = vlmtune.export(vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen")), processor, sys.argv[1])
reloaded, _ = vlmtune.load_exported(out)
try:
    vlmtune.load("vlmtune-test/not-cached")
except FileNotFoundError as err:
    message = str(err)
folder = str(vlmtune.loading.checkpoint_folder("vlmtune-test/tiny-qwen"))
print(json.dumps({"rows": len(rows), "answer": rows[0]["messages"][1]["content"][0]["text"],
                  "name_or_path": model.name_or_path, "folder": folder, "family": family.name, "message": message,
                  "base": json.load(open(out / "adapter_config.json"))["base_model_name_or_path"],
                  "source": json.load(open(out / "vlmtune.json"))["base_model_source"]}))
"""


def _cache(cache, repo, files):
    """Lay ``files`` (name -> source path) out as ``repo`` in a Hugging Face hub cache, as a download would."""
    snapshot = cache / repo / "snapshots" / "0123456789abcdef"
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def test_hub_ids_load_from_the_cache_offline_and_an_export_reloads(tiny_qwen, latex_data, tmp_path):
    import pyarrow.parquet as pq

    cache = tmp_path / "hub"
    snapshot = _cache(cache, "models--vlmtune-test--tiny-qwen", {p.name: p for p in tiny_qwen.iterdir()})
    data = {f"data/{split}-00000-of-00001.parquet": latex_data / f"{split}.parquet" for split in ("train", "test")}
    _cache(cache, "datasets--vlmtune-test--latex", data)
    spec = tmp_path / "hub_latex.yaml"
    spec.write_text(
        "name: hub_latex\nsource: {type: hub, hub: vlmtune-test/latex}\ncolumns: {image: image, text: text}\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out"), str(spec)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    test = pq.read_table(latex_data / "test.parquet")
    assert result["rows"] == test.num_rows and result["answer"] == test.column("text")[0].as_py()
    assert result["folder"] == str(snapshot)
    assert result["name_or_path"] == "vlmtune-test/tiny-qwen"
    assert result["family"] == "qwen2_5_vl"
    assert result["base"] == "vlmtune-test/tiny-qwen" and result["source"] == "hub"
    assert result["message"].startswith("'vlmtune-test/not-cached' is not a local folder, and not in the Hugging Face")
    assert "HF_HUB_OFFLINE is set" in result["message"]
