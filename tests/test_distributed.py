"""Two gloo processes on the CPU (``tests/distributed_worker.py``): DDP and FSDP2, LoRA and QLoRA, on tiny Qwen2.5-VL
and Gemma-3, against one process with the same global batch; mixed text / image ranks; FSDP2 resume; bad launches.

Every job trains on text-only and image rows shuffled together, whose answers differ in length: a loss averaged
per process (or per micro-step, as ``qwen_lora_ddp`` accumulates 2) instead of over the step's supervised tokens
would differ from one process at step 1 by ~2%.

One launch runs every job (a process start and the imports cost more than a tiny run), killed after 420 s so
that a hang fails instead of stalling CI.
"""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

import vlmtune
from vlmtune.distributed import per_device_batch, resolve_mode
from vlmtune.distributed.fsdp import check_shardable
from vlmtune.distributed.rank0_load import check_loaded
from vlmtune.distributed.setup import check_fsdp_eval
from vlmtune.testing import run_two_processes

WORKER = Path(__file__).with_name("distributed_worker.py")
# The single-process references run the worker's own code in this process (tests/ is not a package).
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import lora, mixed_rows, run  # noqa: E402

JOBS = {  # name: (family, quant, mode[, gradient accumulation steps of the 4 rows per step])
    "qwen_lora_ddp": ("qwen2_5_vl", "none", "ddp", 2),
    "qwen_lora_fsdp": ("qwen2_5_vl", "none", "fsdp"),
    "qwen_qlora_ddp": ("qwen2_5_vl", "nf4", "ddp"),
    "qwen_qlora_fsdp": ("qwen2_5_vl", "nf4", "fsdp"),
    "gemma_lora_fsdp": ("gemma3", "none", "fsdp"),
    "gemma_qlora_ddp": ("gemma3", "nf4", "ddp"),
    "gemma_qlora_fsdp": ("gemma3", "nf4", "fsdp"),
    "gemma_lora_fsdp_rank0": ("gemma3", "none", "fsdp-rank0"),  # rank 1 loads empty, filled from rank 0
    "qwen_lora_fsdp_kernels": ("qwen2_5_vl", "none", "fsdp-kernels"),  # the kernels run on gathered weights
}
# fp32 on the CPU: the losses agree to ~1e-7. The weights agree as closely but for a few single elements: rows of
# different lengths are padded differently in a 2-row half-batch (or a 1-row micro-step) than in the 4-row batch,
# and the process's thread count orders the matmul sums; Adam divides a near-zero early gradient (a LoRA A matrix's)
# by its own size, which carries that rounding into up to ~6e-5 of a weight of ~0.1 (one process accumulating 4 x 1
# rows differs from 1 x 4 rows by as much). A normalisation bug moves every element: the mean difference says so.
RTOL, ATOL = 1e-4, 1e-5
WEIGHT_ATOL, WEIGHT_MEAN_ATOL = 2e-4, 1e-6


@pytest.fixture(scope="module")
def launch(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    command = ["--out", str(out), "--mixed", str(tiny_checkpoint("qwen2_5_vl"))]
    command += ["--resume", str(tiny_checkpoint("qwen2_5_vl"))]
    for name, (family, quant, mode, *accum) in JOBS.items():
        command += ["--job", ":".join([name, str(tiny_checkpoint(family)), quant, mode, *map(str, accum)])]
    run_two_processes(str(WORKER), command, timeout=420)
    return out


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory):
    """``single(family, quant)``: losses, LoRA weights and model of one process on the same global batch."""
    done = {}

    def reference(family: str, quant: str):
        if (family, quant) not in done:
            out = tmp_path_factory.mktemp(f"single_{family}_{quant}")
            result, model, _ = run(str(tiny_checkpoint(family)), quant, "auto", out, mixed_rows())
            done[family, quant] = (result.losses, lora(model), model)
        return done[family, quant]

    return reference


def _ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("job", list(JOBS))
def test_two_processes_train_as_one_process_with_the_same_global_batch(launch, single, job):
    family, quant = JOBS[job][:2]
    losses, weights, _ = single(family, quant)
    ranks = _ranks(launch / job)
    assert len(ranks[0]["losses"]) == 3 and ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    assert sorted(ranks[0]["lora"]) == sorted(weights) and len(weights) > 0
    for name, value in weights.items():
        # DDP: each rank's own copy; FSDP2: the shards gathered. Either way the same on both ranks, and as one process.
        assert torch.equal(ranks[0]["lora"][name], ranks[1]["lora"][name]), name
        got = ranks[0]["lora"][name]
        torch.testing.assert_close(got, value, rtol=RTOL, atol=WEIGHT_ATOL, msg=f"{name} differs".format)
        assert (got - value).abs().mean() < WEIGHT_MEAN_ATOL, name


@pytest.mark.parametrize("job", ["qwen_lora_fsdp", "gemma_lora_fsdp", "qwen_lora_ddp"])
def test_the_export_loads_in_plain_peft_with_the_single_process_logits(launch, single, tiny_checkpoint, job):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    family, quant = JOBS[job][:2]
    _, _, trained = single(family, quant)
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(family), dtype=torch.float32)
    exported = PeftModel.from_pretrained(base, launch / job / "export").eval()
    input_ids = torch.tensor([[5, 17, 42, 8, 99, 23]])
    with torch.no_grad():
        want = trained.eval()(input_ids=input_ids).logits
        got = exported(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_the_kernels_run_under_fsdp_on_the_gathered_weights(launch):
    """The kernels job trained with vlmtune's kernels swapped in at every step (the job's numbers are checked against
    the single-process run, kernels off, like every job's); the others did not."""
    for rank in (0, 1):
        on = torch.load(launch / "qwen_lora_fsdp_kernels" / f"rank{rank}.pt")["kernel_modules"]
        off = torch.load(launch / "qwen_lora_fsdp" / f"rank{rank}.pt")["kernel_modules"]
        assert len(on) == 3 and min(on) > 0 and off == [0, 0, 0]


def test_fsdp_with_rank_1_loaded_empty_trains_as_when_every_rank_loads(launch):
    # Gemma-3: a tied lm_head, rotary inv_freq and embed_scale buffers outside the state dict; any of them
    # left as to_empty's garbage on rank 1 would move every loss.
    empty, whole = _ranks(launch / "gemma_lora_fsdp_rank0"), _ranks(launch / "gemma_lora_fsdp")
    assert empty[1]["loaded"] == {"devices": ["meta"], "lora_devices": ["meta"]}  # nothing materialised on rank 1
    assert empty[0]["loaded"] == {"devices": ["cpu"], "lora_devices": ["cpu"]}
    assert empty[1]["tied"] and empty[0]["tied"]  # lm_head still is the embedding after sharding and to_empty
    assert empty[0]["losses"] == whole[0]["losses"] and empty[1]["losses"] == whole[1]["losses"]
    assert sorted(empty[0]["lora"]) == sorted(whole[0]["lora"])
    for name, value in whole[0]["lora"].items():
        # The same numbers as every rank loading: rank 0's LoRA init and weights reach rank 1 bit for bit.
        assert torch.equal(empty[0]["lora"][name], value) and torch.equal(empty[1]["lora"][name], value), name


def test_only_ranks_above_0_of_a_launch_load_empty_and_only_fsdp_trains_them(tiny_qwen, monkeypatch, caplog):
    model, _, _ = vlmtune.load(tiny_qwen, empty_on_other_ranks=True)
    assert not any(p.is_meta for p in model.parameters())  # one process: nothing to fill it from
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.INFO, logger="vlmtune.loading"):
        model, _, _ = vlmtune.load(tiny_qwen, quant="nf4", empty_on_other_ranks=True)
    assert not any(p.is_meta for p in model.parameters())
    assert "quantised weights load on every rank" in caplog.text
    monkeypatch.setenv("RANK", "1")
    model, _, _ = vlmtune.load(tiny_qwen, empty_on_other_ranks=True)
    assert all(p.is_meta for p in model.parameters()) and not model.training
    check_loaded(model, "fsdp")
    with pytest.raises(ValueError, match=r"loaded empty .* only distributed='fsdp' fills from rank 0.*'ddp'"):
        check_loaded(model, "ddp")


def test_a_text_only_rank_and_an_image_rank_train_together_under_fsdp(launch):
    # Rank 0 never sees an image: without the blank-image pass it would skip the sharded vision blocks'
    # all-gathers that rank 1 waits on (the launch's kill timeout turns that hang into a failure).
    ranks = _ranks(launch / "mixed")
    assert len(ranks[0]["losses"]) == 3 and ranks[0]["losses"] == ranks[1]["losses"]
    assert all(torch.isfinite(torch.tensor(ranks[0]["losses"])))
    vision = [n for n in ranks[0]["lora"] if ".visual." in n]
    assert len(vision) == 2 * 5 * 2  # 2 vision blocks x (qkv, proj, gate, up, down) x (A, B)
    for name in vision:
        assert torch.equal(ranks[0]["lora"][name], ranks[1]["lora"][name]), name


def test_the_eval_loss_runs_sharded_during_fsdp_training(launch):
    # 6 held-out rows over 2 ranks and eval batches of 2: the ranks evaluate different rows, some without an image.
    evals = [r["eval"] for r in _ranks(launch / "mixed")]
    assert evals[0] == evals[1] and len(evals[0]) == 2  # before the first step and at the end
    assert all(torch.isfinite(torch.tensor(evals[0])))
    assert evals[0][1] < evals[0][0]  # 3 steps at lr 1e-2 on similar rows lower it


def test_fsdp_refuses_generation_metrics_and_best_metric_during_training():
    config = vlmtune.TrainConfig(eval_rows=[{}], eval_samples=4)
    with pytest.raises(ValueError, match=r"eval loss only: generation metrics.*set eval_samples=0 \(got 4\)"):
        check_fsdp_eval(config)
    config = vlmtune.TrainConfig(eval_rows=[{}], eval_samples=0, best_metric="loss", eval_steps=1, save_steps=1)
    with pytest.raises(ValueError, match=r"best_metric='loss' is not supported with distributed='fsdp'"):
        check_fsdp_eval(config)
    check_fsdp_eval(vlmtune.TrainConfig(eval_rows=[{}], eval_samples=0))
    check_fsdp_eval(vlmtune.TrainConfig())


def test_fsdp_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(launch):
    ranks = _ranks(launch / "resume")
    assert ranks[0]["steps_run"] == 2  # steps 3 and 4 only: 1 and 2 came from the checkpoint
    assert len(ranks[0]["losses"]) == 4
    for name, value in ranks[0]["whole"].items():
        torch.testing.assert_close(ranks[0]["resumed"][name], value, rtol=RTOL, atol=ATOL, msg=name)
    checkpoint = launch / "resume" / "whole" / "checkpoints" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in checkpoint.iterdir()
    }


def test_a_world_size_that_does_not_divide_the_batch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"batch_size=4 does not split over 3 processes.*\(3 or 6\)"):
        per_device_batch(vlmtune.TrainConfig(batch_size=4))
    assert per_device_batch(vlmtune.TrainConfig(batch_size=6)).batch_size == 2
    assert per_device_batch(vlmtune.TrainConfig(batch_size=4, packing=True)).batch_size == 4


def test_fsdp_refuses_int8_and_packed_uint8_4bit_weights(tiny_qwen):
    model, _, family = vlmtune.load(tiny_qwen, quant="nf4", quant_storage="uint8")
    with pytest.raises(ValueError, match=r"4-bit weight stored as torch.uint8.*quant_storage='auto'"):
        check_shardable(model, family)
    model, _, family = vlmtune.load(tiny_qwen, quant="nf4", quant_storage="float32")
    check_shardable(model, family)  # a float storage shards
    model, _, family = vlmtune.load(tiny_qwen, quant="int8")
    with pytest.raises(ValueError, match=r"8-bit bitsandbytes weight, which FSDP2 cannot shard.*quant='nf4'"):
        check_shardable(model, family)


def test_an_unknown_distributed_mode_is_refused():
    with pytest.raises(ValueError, match=r"distributed must be one of \('auto', 'ddp', 'fsdp'\)"):
        vlmtune.TrainConfig(distributed="zero3")


def test_an_accelerate_fsdp_config_selects_vlmtunes_fsdp2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_mode("auto", 2) == "fsdp"
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # accelerate stays the launcher, its plugin off
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert (resolve_mode("auto", 2), resolve_mode("auto", 1), resolve_mode("fsdp", 1)) == ("ddp", "none", "fsdp")


def test_the_command_line_trains_and_exports_under_torchrun(tiny_qwen, latex_data, tmp_path):
    """``vlmtune train`` as users launch it, FSDP2 over 2 processes: one export, the summary printed once."""
    out = tmp_path / "out"
    args = ["vlmtune.cli", "train", "--model", str(tiny_qwen), "--data", str(latex_data), "--out", str(out)]
    args += ["--max-steps", "2", "--batch-size", "2", "--eval-samples", "0", "--distributed", "fsdp"]
    output = run_two_processes("-m", [*args, "--logging-steps", "1"], timeout=300)
    # Rank 0 alone reports and logs where the export went.
    assert output.count("first loss") == output.count("report: ") == output.count("exported adapter") == 1
    assert (out / "adapter_model.safetensors").exists() and (out / "processor_config.json").exists()
    assert not list(out.glob("*.tmp"))
