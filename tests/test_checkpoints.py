"""Crash-safe checkpoints: a run killed (SIGKILL) at any stage of a checkpoint write resumes bit-identically.

The killed runs are ``vlmtune train`` in a subprocess (``tests/checkpoint_worker.py``) on the tiny Qwen2.5-VL, fp32
on the CPU, kernels off; each is compared with one uninterrupted run shared by the module.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.checkpoints import MARKER, NoCheckpointError, ResumeError, resolve_resume, resume_line, rotate, scan

WORKER = Path(__file__).with_name("checkpoint_worker.py")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "latex_ocr.py"
STEPS = 12  # 18 training rows at batch 2: 9 steps an epoch, so the runs cross an epoch boundary at step 9
# Dropout on: a resume that lost the RNG state would draw other masks and differ in the last bits.
FLAGS = ["--batch-size", "2", "--lr", "5e-3", "--dropout", "0.1", "--logging-steps", "1", "--seed", "0"]
FLAGS += ["--eval-samples", "0", "--no-kernels"]
KILLED = -signal.SIGKILL


def _train(out: Path, model, data, *flags: str, kill: str | None = None, steps=STEPS, save=2):
    """``vlmtune train`` in a subprocess, killed at ``kill`` (``stage:step``, see the worker) when given."""
    env = {k: v for k, v in os.environ.items() if k != "CKPT_TEST_KILL"}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", **({"CKPT_TEST_KILL": kill} if kill else {}))
    command = [sys.executable, str(WORKER), "--model", str(model), "--data", str(data), "--out", str(out)]
    command += [*FLAGS, "--max-steps", str(steps), "--save-steps", str(save), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _result(out: Path, steps=STEPS) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The exported adapter and the losses of every step, from the last checkpoint's log."""
    state = json.loads((out / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return load_file(out / "adapter_model.safetensors"), [e["loss"] for e in state["log_history"] if "loss" in e]


def _first_step(run) -> int:
    """The first optimiser step a worker ran: 1 for a fresh run, N + 1 for one resumed from checkpoint-N."""
    return int(re.search(r"worker: step (\d+)", run.stderr)[1])  # after a progress bar's \r, on the bar's line


def _error_line(run) -> str:
    """The CLI's one error line (a hint line follows it)."""
    return next(line for line in run.stderr.splitlines() if line.startswith("vlmtune train: error: "))


def _assert_same(result, reference) -> None:
    (adapter, losses), (expected_adapter, expected_losses) = result, reference
    assert losses == expected_losses  # every step, bit for bit
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter), "adapter differs"


@pytest.fixture(scope="module")
def reference(tiny_qwen, latex_data, tmp_path_factory):
    """The uninterrupted run: its output folder and result."""
    out = tmp_path_factory.mktemp("reference")
    run = _train(out, tiny_qwen, latex_data)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, _result(out)


def _recipe():
    spec = importlib.util.spec_from_file_location("latex_ocr_recipe_checkpoints", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _recipe_config(model, data, out, *flags: str, steps=STEPS):
    args = ["--model", str(model), "--data", str(data), "--out", str(out), *FLAGS]
    return _recipe().parse_args([*args, "--max-steps", str(steps), "--save-steps", "2", *flags])


def test_killed_at_every_stage_of_a_checkpoint_write_the_run_resumes_bit_identically(
    reference, tiny_qwen, latex_data, tmp_path
):
    # One run, killed again and again: each resume continues from the last complete checkpoint and adds its own
    # steps to the final result, so the end equals the uninterrupted run only if every resume was exact. The
    # resume from checkpoint-8 crosses the epoch boundary (step 9); the one from checkpoint-10 starts inside epoch 2.
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    first = _train(out, tiny_qwen, latex_data, kill="folder:2")
    assert first.returncode == KILLED, first.stderr[-3000:]
    failed = _train(out, tiny_qwen, latex_data, "--resume")
    assert failed.returncode == 2
    assert _error_line(failed) == (
        f"vlmtune train: error: cannot resume: no complete checkpoint in the output folder {out} "
        f"(looked in {checkpoints}; skipped incomplete: .checkpoint-2.tmp (a save cut short))"
    )
    assert "Traceback" not in failed.stderr
    run = _train(out, tiny_qwen, latex_data, kill="folder:4")  # a fresh start over the leftover
    assert run.returncode == KILLED, run.stderr[-3000:]
    # (where this run is killed, the checkpoint it resumes from, the save the previous kill cut short)
    chain = [("adapter:6", 2, 4), ("optimizer:8", 4, 6), ("rename:10", 6, 8), ("step:12", 8, 10), (None, 10, None)]
    for kill, resumed_from, cut_short in chain:
        assert scan(checkpoints)[0] == checkpoints / f"checkpoint-{resumed_from}"
        assert not (checkpoints / f"checkpoint-{cut_short}").exists()
        run = _train(out, tiny_qwen, latex_data, "--resume", kill=kill)
        assert run.returncode == (KILLED if kill else 0), (kill, run.stderr[-3000:])
        assert _first_step(run) == resumed_from + 1, kill  # it went on from there, it did not start over
        line = f"vlmtune.checkpoints: resuming from {checkpoints / f'checkpoint-{resumed_from}'} (step {resumed_from})"
        if cut_short is not None:
            line = f"WARNING {line}; skipped incomplete: .checkpoint-{cut_short}.tmp (a save cut short)"
        assert (line if cut_short else f"INFO {line}") in run.stderr.splitlines(), kill
    _assert_same(_result(out), reference[1])
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{s}" for s in (10, 12, 2, 4, 6, 8)]


def test_a_packed_run_killed_in_its_second_epoch_resumes_bit_identically(tiny_qwen, latex_data, tmp_path):
    # max_length 300 packs the 18 rows into 5 bins: 5 steps an epoch; checkpoint-6 is inside epoch 2.
    packed = ("--packing", "--max-length", "300")
    expected = tmp_path / "expected"
    assert _train(expected, tiny_qwen, latex_data, *packed, save=3).returncode == 0
    out = tmp_path / "run"
    assert _train(out, tiny_qwen, latex_data, *packed, save=3, kill="optimizer:9").returncode == KILLED
    run = _train(out, tiny_qwen, latex_data, *packed, "--resume", save=3)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-6'} (step 6)" in run.stderr
    assert _first_step(run) == 7
    _assert_same(_result(out), _result(expected))


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resumes(
    reference, tiny_qwen, latex_data, tmp_path
):
    # The rename of checkpoint-4 fails with ENOSPC; with save_total_limit 1 checkpoint-2 must still be there.
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    run = _train(out, tiny_qwen, latex_data, "--save-total-limit", "1", kill="enospc:4")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"vlmtune train: error: could not write checkpoint {checkpoints / 'checkpoint-4'}: "
        f"[Errno 28] No space left on device: '{checkpoints / 'checkpoint-4'}'; "
        f"the last good checkpoint is {checkpoints / 'checkpoint-2'} "
        "(free space or fix permissions, then resume with --resume)"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no half one, nothing left over
    assert not (out / "adapter_model.safetensors").exists()  # the run stopped: no export of a half run
    run = _train(out, tiny_qwen, latex_data, "--save-total-limit", "1", "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _first_step(run) == 3
    _assert_same(_result(out), reference[1])
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{STEPS}"]


def test_resume_without_a_checkpoint_names_the_output_folder_and_creates_nothing(tiny_qwen, latex_data, tmp_path):
    out = tmp_path / "never-trained"
    config = _recipe_config(tiny_qwen, latex_data, out, "--resume")
    with pytest.raises(NoCheckpointError) as caught:
        _recipe().main(config)
    assert str(caught.value) == (
        f"cannot resume: no complete checkpoint in the output folder {out} (looked in {out / 'checkpoints'})"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--batch-size", "4"], "training.batch_size was 2, is 4"),
        (["--r", "8"], "tuning.r was 16, is 8"),
        (["--max-steps", "20"], "training.max_steps was 12, is 20"),
        (["--data", "OTHER"], "data was '18 rows (18 kept), sha256 "),
    ],
    ids=["batch", "lora-rank", "schedule", "data"],
)
def test_a_changed_run_is_refused_naming_the_difference(change, named, reference, tiny_qwen, latex_data, tmp_path):
    from vlmtune.data.latex_ocr import make_latex_ocr

    if change == ["--data", "OTHER"]:
        change = ["--data", str(tmp_path / "other")]
        make_latex_ocr(20, tmp_path / "other", seed=1, test_fraction=0.25)
    checkpoint = reference[0] / "checkpoints" / "checkpoint-4"
    config = _recipe_config(tiny_qwen, latex_data, tmp_path / "out", "--resume", str(checkpoint), *change)
    with pytest.raises(ResumeError, match="the run changed since it was saved") as caught:
        _recipe().main(config)
    assert named in str(caught.value) and "--resume-force" in str(caught.value)
    assert str(caught.value).count(", is ") == (2 if change[:1] == ["--r"] else 1)  # LoRA r: the shapes too


def test_resume_force_continues_a_changed_run(reference, tiny_qwen, latex_data, tmp_path, caplog):
    checkpoint = reference[0] / "checkpoints" / f"checkpoint-{STEPS}"
    config = _recipe_config(tiny_qwen, latex_data, tmp_path / "out", "--resume", str(checkpoint), "--resume-force")
    config.training.max_steps = STEPS + 2
    with caplog.at_level(logging.WARNING, logger="vlmtune.checkpoints"):
        summary = _recipe().main(config)
    assert "training.max_steps was 12, is 14" in caplog.text and "(forced)" in caplog.text
    assert summary["losses"][:STEPS] == reference[1][1] and len(summary["losses"]) == STEPS + 2


def _copy_checkpoints(reference, folder: Path, steps=(2, 4)) -> Path:
    for step in steps:
        shutil.copytree(reference[0] / "checkpoints" / f"checkpoint-{step}", folder / f"checkpoint-{step}")
    return folder


def test_an_incomplete_checkpoint_in_place_is_skipped_for_the_newest_complete_one(reference, tmp_path):
    # What transformers alone leaves when killed writing optimizer.pt in place: adapter files, a 0-byte optimizer.
    folder = _copy_checkpoints(reference, tmp_path / "out" / "checkpoints")
    partial = folder / "checkpoint-6"
    partial.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(folder / "checkpoint-4" / name, partial / name)
    (partial / "optimizer.pt").touch()
    checkpoint, skipped = resolve_resume(True, str(tmp_path / "out"))
    assert checkpoint == folder / "checkpoint-4"
    assert resume_line(checkpoint, skipped) == (
        f"resuming from {folder / 'checkpoint-4'} (step 4); skipped incomplete: checkpoint-6 (optimizer.pt is empty; "
        "missing scheduler.pt; missing rng_state.pth; missing trainer_state.json; no vlmtune_checkpoint.json "
        "(vlmtune writes it last: the save was cut short, or vlmtune did not write this folder))"
    )
    with pytest.raises(ResumeError) as caught:
        resolve_resume(str(partial), "unused")
    assert str(caught.value).startswith(f"cannot resume from {partial}: it is incomplete: optimizer.pt is empty, ")
    assert str(caught.value).endswith(f"; the newest complete one is {folder / 'checkpoint-4'}")


def test_a_checkpoint_whose_files_do_not_match_its_marker_is_refused(reference, tmp_path):
    folder = _copy_checkpoints(reference, tmp_path / "checkpoints", steps=(4,))
    checkpoint = folder / "checkpoint-4"
    size = (checkpoint / "optimizer.pt").stat().st_size
    with open(checkpoint / "optimizer.pt", "r+b") as handle:
        handle.truncate(size // 2)
    (checkpoint / "scheduler.pt").unlink()
    with pytest.raises(ResumeError) as caught:
        resolve_resume(str(checkpoint), "unused")
    assert str(caught.value) == (
        f"cannot resume from {checkpoint}: it is incomplete: optimizer.pt has {size // 2} bytes of {size}, "
        "missing scheduler.pt"
    )
    with pytest.raises(NoCheckpointError, match=re.escape(f"cannot resume: {tmp_path / 'nowhere'} does not exist")):
        resolve_resume(str(tmp_path / "nowhere"), "unused")


def test_a_folder_of_checkpoints_resumes_its_newest_and_force_takes_one_without_a_marker(reference, tmp_path):
    folder = _copy_checkpoints(reference, tmp_path / "out" / "checkpoints")
    assert resolve_resume(str(tmp_path / "out"), "unused") == (folder / "checkpoint-4", [])
    assert resolve_resume(str(folder), "unused") == (folder / "checkpoint-4", [])
    (folder / "checkpoint-4" / MARKER).unlink()  # as a complete checkpoint of an older vlmtune
    with pytest.raises(ResumeError, match="no vlmtune_checkpoint.json"):
        resolve_resume(str(folder / "checkpoint-4"), "unused")
    assert resolve_resume(str(folder / "checkpoint-4"), "unused", force=True) == (folder / "checkpoint-4", [])
    assert resume_line(folder / "checkpoint-4", []) == f"resuming from {folder / 'checkpoint-4'} (step 4)"


def test_rotation_keeps_the_newest_complete_checkpoints(reference, tmp_path):
    folder = _copy_checkpoints(reference, tmp_path / "checkpoints", steps=(2, 4, 6))
    (folder / "checkpoint-8").mkdir()  # incomplete: neither counted nor deleted
    rotate(folder, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    rotate(folder, keep=None)
    assert len(list(folder.iterdir())) == 3
