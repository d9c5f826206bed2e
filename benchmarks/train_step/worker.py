"""One benchmark configuration in its own process: set the model up, run the plain training loop, report.

The driver (``processes.run_config``) starts this once per configuration (fresh CUDA context, so peak memory is the
configuration's own) and reads the one ``@@RESULT`` JSON line it prints. Every configuration runs the same
loop on the same batches — forward, backward, optimizer step, ``zero_grad`` — under bf16 autocast on CUDA
(fp32 on the CPU), with fused AdamW at lr 2e-4 over the trainable parameters: differences come from the model
setup alone (the packed configurations train on the same samples as one padding-free row per step). Unsloth's
configurations import ``unsloth`` before this module (its patches must precede transformers), which
``processes.worker_main`` does. With ``--profile`` one more step runs after the timed ones, under the profiler
(``profiling.py``), and its summary goes into the record's ``profile``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_step.batches import NO_PACKING_REASON
from benchmarks.train_step.profiling import profile_step
from benchmarks.train_step.specs import CONFIGS, HF_PROCESSOR_KEYS, MODELS, BenchConfig, ModelSpec, split_name

RESULT_PREFIX = "@@RESULT "
LORA_R = LORA_ALPHA = 16
LR = 2e-4
GIB = 2**30


class NotAvailable(Exception):
    """The configuration cannot run here (a package or module is missing, the stack does not serve the family, the
    shape has nothing to pack); reported as ``n/a``."""


@dataclass(frozen=True)
class Steps:
    """What one configuration trains on: ``batches[i % len(batches)]`` at step ``i``, and what each batch holds.

    Attributes:
        batches: the padded batches, or for a packed configuration the packed rows of the same samples.
        samples: samples per batch.
        images: images per batch (counted on the encoded samples, not on pixel tensors that run over views).
        packed: whether ``batches`` are packed rows (no pad token, no 2-D ``attention_mask``).
    """

    batches: list[dict[str, Any]]
    samples: list[int]
    images: list[int]
    packed: bool

    packed_rows: dict[str, list[dict[str, Any]]] | None = None
    """A packed configuration's rows for each attention they were built for (``batches`` holds the SDPA ones)."""

    @classmethod
    def load(cls, path: Path, packed: bool) -> Steps:
        """Read ``batches.build_steps``' file; ``NotAvailable`` when it holds no packed rows."""
        data = torch.load(path, weights_only=True)
        if not packed:
            return cls(data["batches"], data["samples"], data["images"], packed)
        if data["packed"] is None:
            raise NotAvailable(NO_PACKING_REASON)
        return cls(data["packed"]["sdpa"], data["samples"], data["images"], packed, data["packed"])

    def attending(self, attention: str) -> Steps:
        """The same steps as rows built for ``attention`` (``"varlen"``: no dense masks, Gemma-3's image blocks)."""
        if self.packed_rows is None:
            return self
        return replace(self, batches=self.packed_rows[attention])


# ------------------------------------------------------------------------------------------------ model setup


def _compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _apply_liger(model, family: str) -> str:
    try:
        import liger_kernel.transformers as liger
    except ImportError as err:
        raise NotAvailable(f"liger-kernel is not importable ({err})") from err
    patch = {"qwen2_5_vl": liger.apply_liger_kernel_to_qwen2_5_vl, "gemma3": liger.apply_liger_kernel_to_gemma3}
    if family not in patch:
        raise NotAvailable(f"Liger-Kernel has no patch for {family} in this benchmark (it has {sorted(patch)})")
    patch[family](model=model)  # its defaults: RoPE, RMSNorm, gated MLP, fused linear cross-entropy
    return patch[family].__name__


def setup_hf(cfg: BenchConfig, spec: ModelSpec, checkpoint: Path, device: str, vision: str):
    """The baseline as the public recipes write it (TRL / peft QLoRA examples)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    dtype = _compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa", "device_map": device}
    if cfg.quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, **kwargs)
    info: dict[str, Any] = {}
    if cfg.liger:
        info["liger"] = _apply_liger(model, spec.family)
    checkpointing = {"use_reentrant": False}
    if cfg.upcast:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    targets = list(spec.lora_suffixes) if vision == "lora" else spec.language_only_regex
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none", target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora), info


def setup_unsloth(cfg: BenchConfig, spec: ModelSpec, checkpoint: Path, device: str, vision: str):
    """Unsloth's vision path as its notebooks write it, with the same LoRA placement."""
    from unsloth import FastVisionModel

    try:
        model, _ = FastVisionModel.from_pretrained(
            str(checkpoint),
            load_in_4bit=cfg.quant,
            load_in_16bit=not cfg.quant,
            use_gradient_checkpointing="unsloth",
            max_seq_length=4096,
        )
    except NotImplementedError as err:  # Unsloth's way of saying "<model> not supported yet!"
        raise NotAvailable(f"unsloth: {err}") from err
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=vision == "lora",
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        random_state=3407,
        use_gradient_checkpointing="unsloth",
    )
    FastVisionModel.for_training(model)
    return model, {}


def setup_vlmtune(cfg: BenchConfig, spec: ModelSpec, checkpoint: Path, device: str, vision: str):
    """vlmtune's public API: load, apply_tuning from the adapter's tags, optionally the kernels."""
    import vlmtune
    from vlmtune.tuning import TuningConfig, apply_tuning

    apply_kernels = None
    if cfg.kernels:
        try:
            from vlmtune.kernels.patch import apply_kernels
        except ImportError as err:
            raise NotAvailable(f"vlmtune.kernels.patch is not importable ({err})") from err
    model, _, adapter = vlmtune.load(checkpoint, quant="nf4" if cfg.quant else "none", device=device)
    tuning = TuningConfig(
        vision=vision,
        language="lora",
        r=LORA_R,
        alpha=LORA_ALPHA,
        offload_activations=cfg.offload,
        lora_dtype=cfg.lora_dtype,
        vision_micro_batch=cfg.vision_micro_batch,
        vision_checkpointing=cfg.vision_checkpointing,
    )
    model = apply_tuning(model, adapter, tuning)
    info: dict[str, Any] = {}
    if apply_kernels is not None:
        patch = apply_kernels(model, adapter)
        info["kernels_patched"] = {op: len(names) for op, names in patch.patched.items()}
        info["kernels_skipped"] = len(patch.skipped)
    if cfg.compile != "off":
        from vlmtune.compile import compile_layers

        compiled = compile_layers(model, adapter, cfg.compile)
        info["compiled_layers"] = {tower: len(names) for tower, names in compiled.layers.items()}
    if cfg.packed:  # the rows vlmtune.train would build for this model (after its kernels and compilation)
        from vlmtune.kernels.hf.rope import packed_attention

        info["packed_attention"] = packed_attention(model, adapter, compiled=cfg.compile in ("language", "both"))
    return model, info


SETUPS: dict[str, Callable] = {"hf": setup_hf, "unsloth": setup_unsloth, "vlmtune": setup_vlmtune}


# ------------------------------------------------------------------------------------------------------ report


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "liger-kernel", "unsloth", "unsloth-zoo"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


_VISION_MODULE = re.compile(r"(^|\.)(visual|vision_tower|vpm)\.")  # Qwen-VL, Gemma-3 / MiniCPM-V 4.6, the 2.6 layout


def _lora_counts(model) -> dict[str, int]:
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0]
    vision = [n for n in names if _VISION_MODULE.search(n)]
    return {
        "lora_modules": len(names),
        "lora_vision_modules": len(vision),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> dict[str, float | None]:
    if not device.startswith("cuda"):
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def _no_range(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train_step(model, optimizer, inputs: dict[str, torch.Tensor], cuda: bool, mark: Callable = _no_range) -> float:
    """One step of the loop: forward (bf16 autocast on CUDA), backward, AdamW step, ``zero_grad``; the loss.

    ``mark(name)`` wraps the forward, the backward and the optimizer step: a no-op in the timed steps, the
    profiler's ranges in the profiled one (``profiling.StepRanges``).
    """
    with mark("forward"), torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        loss = model(**inputs).loss
    with mark("backward"):
        loss.backward()
    with mark("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach().float().item())


def _to_device(value: Any, device: str) -> Any:
    """Tensors moved, dicts and lists walked (Gemma-3's packed ``attention_mask`` is a dict of 4-D masks, MiniCPM-V
    2.6's ``image_bound`` a list of tensors), anything else (``use_cache``, ``max_length_q``) as it is."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _inputs(batch: dict[str, Any], keys: set[str], device: str) -> dict[str, Any]:
    return {k: _to_device(v, device) for k, v in batch.items() if k in keys}


def count_tokens(batch: dict[str, Any], packed: bool) -> int:
    """Non-pad tokens of a batch: the ``attention_mask`` sum of a padded batch; every token of a packed row, which
    has no pad token (and no 2-D ``attention_mask``: none at all, or Gemma-3's dict of 4-D masks)."""
    return int(batch["input_ids"].numel()) if packed else int(batch["attention_mask"].sum())


def train_loop(
    model, optimizer, data: Steps, keys, device: str, warmup: int, steps: int, load_start: float, result: dict
) -> None:
    """The one loop every configuration runs; fills ``result`` as it goes (so an OOM keeps what was measured)."""
    cuda = device.startswith("cuda")
    model.train()
    result["tokens_from"] = "input_ids (packed row, no pad token)" if data.packed else "attention_mask"
    losses, times, tokens, images, samples = [], [], [], [], []
    for step in range(warmup + steps):
        index = step % len(data.batches)
        batch = data.batches[index]
        inputs = _inputs(batch, keys, device)
        _sync(device)
        start = time.perf_counter()
        value = train_step(model, optimizer, inputs, cuda)
        _sync(device)
        end = time.perf_counter()
        losses.append(value)
        if step == 0:
            result["first_step_s"] = end - start
            result["warmup_s"] = end - load_start
        if step >= warmup:
            times.append(end - start)
            tokens.append(count_tokens(batch, data.packed))
            images.append(data.images[index])
            samples.append(data.samples[index])
        result["losses"] = losses
    result["step_times_s"] = times
    result["step_s"] = statistics.median(times)
    result["tokens_per_step"] = statistics.mean(tokens)
    result["samples_per_step"] = statistics.mean(samples)
    result["tokens_per_s"] = statistics.median(t / s for t, s in zip(tokens, times, strict=True))
    result["images_per_s"] = statistics.median(i / s for i, s in zip(images, times, strict=True))
    result["loss_first"], result["loss_last"] = losses[0], losses[-1]


def profile_after(model, optimizer, batch, keys, device: str) -> dict[str, Any]:
    """One more step, under the profiler with the tower hooks (``profiling``), after the timed ones."""
    from vlmtune.families import detect

    try:
        adapter = detect(model.config)
        inputs = _inputs(batch, keys, device)
        cuda = device.startswith("cuda")
        return profile_step(model, adapter, device, lambda mark: train_step(model, optimizer, inputs, cuda, mark))
    except Exception as err:  # a failed profile leaves the configuration's timed figures standing
        reason = f"{type(err).__name__}: {err}"[:1000]
        return {"status": "error", "reason": reason, "traceback": traceback.format_exc()[-3000:]}


def memory_phases(model, optimizer, batch, keys, device: str) -> dict[str, float]:
    """One more step with the peak memory of each phase (GiB): where a configuration's peak comes from.

    ``start``: allocated before the step (weights, optimizer state, caches); ``forward_peak`` / ``backward_peak``
    / ``optimizer_peak``: the highest allocation within that phase; ``saved_for_backward``: what the forward
    left allocated (activations kept for backward) over ``start``.
    """
    inputs = _inputs(batch, keys, device)
    phases: dict[str, float] = {}
    torch.cuda.synchronize()
    phases["start"] = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    torch.cuda.synchronize()
    phases["forward_peak"] = torch.cuda.max_memory_allocated() / GIB
    phases["saved_for_backward"] = torch.cuda.memory_allocated() / GIB - phases["start"]
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    phases["backward_peak"] = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    phases["optimizer_peak"] = torch.cuda.max_memory_allocated() / GIB
    return {k: round(v, 3) for k, v in phases.items()}


def run(
    name: str,
    model_name: str,
    checkpoint: Path,
    batches_file: Path,
    device: str,
    warmup: int,
    steps: int,
    vision: str,
    memory_limit_gib: float | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Set configuration ``name`` up and train; return the result record (``status``: ok / oom / n/a / error).

    With ``profile``, one more step runs after the timed ones under the profiler (``result["profile"]``); the
    peak memory figures are taken before it.
    """
    base, suffix = split_name(name)
    vision = suffix or vision
    cfg, spec = CONFIGS[base], MODELS[model_name]
    result: dict[str, Any] = {"config": name, "stack": cfg.stack, "quant": cfg.quant, "vision": vision}
    result["packed"] = cfg.packed
    result.update(device=device, device_name=_device_name(device), dtype=str(_compute_dtype(device)))
    result["versions"] = versions()
    if device.startswith("cuda") and memory_limit_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_gib * GIB / total))
        result["memory_limit_gib"] = memory_limit_gib
    try:
        if cfg.stack in spec.unsupported:
            raise NotAvailable(spec.unsupported[cfg.stack])
        data = Steps.load(batches_file, cfg.packed)
        load_start = time.perf_counter()
        model, info = SETUPS[cfg.stack](cfg, spec, checkpoint, device, vision)
        _sync(device)
        result["load_s"] = time.perf_counter() - load_start
        result.update(info)
        data = data.attending(info.get("packed_attention", "sdpa"))
        batches = data.batches
        keys = set(batches[0]) if cfg.stack == "vlmtune" else set(batches[0]) & HF_PROCESSOR_KEYS
        result["batch_keys"] = sorted(keys)
        result.update(_lora_counts(model))
        if device.startswith("cuda"):
            result["memory_after_load_gib"] = torch.cuda.memory_allocated() / GIB
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=LR, fused=device.startswith("cuda") or None
        )
        train_loop(model, optimizer, data, keys, device, warmup, steps, load_start, result)
        result["status"] = "ok"
        result.update(_peak(device))
        if device.startswith("cuda"):
            result["memory_phases_gib"] = memory_phases(model, optimizer, batches[0], keys, device)
        if profile:
            batch = batches[(warmup + steps) % len(batches)]
            result["profile"] = profile_after(model, optimizer, batch, keys, device)
    except NotAvailable as err:
        result.update(status="n/a", reason=str(err))
    except torch.OutOfMemoryError as err:
        result.update(status="oom", reason=str(err).splitlines()[0][:300])
    except Exception as err:  # the driver reports any failure of one configuration and goes on
        result.update(status="error", reason=f"{type(err).__name__}: {err}"[:1000])
        result["traceback"] = traceback.format_exc()[-4000:]
    for key, value in _peak(device).items():
        result.setdefault(key, value)
    return result


def main(args) -> int:
    """Entry point of the ``worker`` child: print one ``@@RESULT`` line; exit 0 unless the record is missing."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(
        args.config,
        args.model,
        Path(args.checkpoint),
        Path(args.batches),
        args.device,
        args.warmup,
        args.steps,
        args.vision,
        args.memory_limit_gib,
        args.profile,
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0
