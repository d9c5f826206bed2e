"""What a training step costs the first time it meets a sequence length, and with cuDNN's attention left out.

    python -m benchmarks.train_step prepare --model qwen2_5_vl-7b --shape real --batch 8 --count 8 \
        --cache /tmp/vlmtune-bench
    python -m benchmarks.shape_cost --model qwen2_5_vl-7b --out $OUT       # CUDA only

Run from the repository root, after ``prepare`` has built the real-size checkpoint and the real-shape batches.
vlmtune QLoRA with its kernels (the ``vlmtune_qlora_kernels`` configuration of ``benchmarks/train_step``) trains
the first padded batch three times, then the same batch padded with 8, 16, 24 ... more pad tokens (masked, no
labels): each is a sequence length the process has not seen, timed twice, the first time and again. Then the same
with ``torch.backends.cuda.enable_cudnn_sdp(False)`` on new lengths. Then one step of a new length and the same
step again under ``torch.profiler``: the operators whose host time differs most between the two are what a new
length costs. Last, the packed row of the same samples against the padded batch, warm, and the operators whose
host time packing adds. Writes ``shape_cost_<model>.json`` and the profiler tables under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step.specs import CONFIGS, MODELS
from benchmarks.train_step.worker import Steps, _inputs, setup_vlmtune, train_step

_PADS = {"input_ids": 0, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}


def padded_to(batch: dict, extra: int) -> dict:
    """``batch`` with ``extra`` more pad tokens at the end of every row (positions continue at 1, as padding)."""
    out = dict(batch)
    for key, value in [*_PADS.items(), ("position_ids", 1)]:
        if key in out:
            tensor = out[key]
            shape = [*tensor.shape[:-1], extra]
            out[key] = torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], -1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shape_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2_5_vl-7b", choices=sorted(MODELS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vlmtune-bench"))
    parser.add_argument("--steps-file", default="steps_real_b8_n8.pt", help="a file of the prepare step, in the cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    folder = args.cache / args.model
    model, _ = setup_vlmtune(CONFIGS["vlmtune_qlora_kernels"], MODELS[args.model], folder, "cuda", "lora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step(batch) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, batch, True)
        torch.cuda.synchronize()
        return round(time.perf_counter() - start, 4)

    def host_times(batch, name: str) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batch)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
        (args.out / f"shape_cost_{args.model}_{name}.txt").write_text(table)
        return {e.key: e.self_cpu_time_total for e in prof.key_averages()}

    def largest_differences(a: dict, b: dict) -> list:
        return sorted(((a.get(k, 0) - b.get(k, 0), k) for k in set(a) | set(b)), reverse=True)[:25]

    args.out.mkdir(parents=True, exist_ok=True)
    padded = Steps.load(folder / args.steps_file, False)
    batch = _inputs(padded.batches[0], set(padded.batches[0]), "cuda")
    for _ in range(3):
        step(batch)
    record: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    # (pad tokens added, first step s, same step again s) per new length
    record["new_lengths"] = [(e, step(padded_to(batch, e)), step(padded_to(batch, e))) for e in (8, 16, 24, 32)]
    torch.backends.cuda.enable_cudnn_sdp(False)
    record["new_lengths_without_cudnn"] = [
        (e, step(padded_to(batch, e)), step(padded_to(batch, e))) for e in (40, 48, 56, 64)
    ]
    torch.backends.cuda.enable_cudnn_sdp(True)
    first, again = host_times(padded_to(batch, 72), "first"), host_times(padded_to(batch, 72), "again")
    record["first_minus_again_host_us"] = largest_differences(first, again)
    packed = Steps.load(folder / args.steps_file, True)
    row = _inputs(packed.batches[0], set(packed.batches[0]), "cuda")
    for _ in range(3):
        step(row)
    record["warm_padded_s"] = [step(batch) for _ in range(3)]
    record["warm_packed_s"] = [step(row) for _ in range(3)]
    record["packed_minus_padded_host_us"] = largest_differences(host_times(row, "packed"), host_times(batch, "padded"))
    (args.out / f"shape_cost_{args.model}.json").write_text(json.dumps(record, indent=1) + "\n")
    for key in ("new_lengths", "new_lengths_without_cudnn", "warm_padded_s", "warm_packed_s"):
        print(key, record[key])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
