"""``batch_size="auto"`` / ``max_tokens_per_step="auto"``: the largest step that fits the memory cap, by probing.

Before training, :func:`resolve_step_size` runs a few real steps (forward, backward, optimiser step, with the
run's kernels, autocast and optimiser) on the **longest** samples of the data, sized by
:func:`vlmtune.step_search.largest_fitting`, and keeps the largest size whose peak memory (what the allocator
reserves) is at most ``HEADROOM`` of the cap (the rest absorbs fragmentation and steps that differ from the
probe's), to within ``TOLERANCE`` of the largest that would. Once two sizes fit, each probe is aimed just short of
where their line meets the cap: the last probes are the largest steps and cost the most, a miss most of all. On
CUDA a smaller probed step is chosen instead where it trained more than ``SPEED_MARGIN`` more tokens per second
(timed again, warm, against the largest): a step whose attention spans the whole packed row gets slower per token
as it grows (:func:`fastest_fit`). Every probe starts from the same weights and a fresh optimiser; after the
search the trainable parameters, their gradients, the RNG states and the train/eval mode are put back, so the run
trains exactly as if it had been given the chosen number (a test checks the losses match).

The cap is ``TrainConfig.memory_limit_gib``, by default the device's free memory plus what this process already
reserved, less ``MARGIN_GIB`` (the CUDA context and other processes grow). The choice is logged, recorded in the
export's ``vlmtune.json`` (``step_size``) and in checkpoints (a resumed run reuses it instead of probing again).
Without CUDA there is no peak-memory counter to read: "auto" then takes ``CPU_BATCH_SIZE`` / ``max_length`` tokens
and says so in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from vlmtune.step_search import GIB, NothingFits, largest_fitting

logger = logging.getLogger(__name__)

AUTO = "auto"
HEADROOM = 0.9
MARGIN_GIB = 1.0
CPU_BATCH_SIZE = 4
MAX_BATCH = 1024
TOKEN_GRANULARITY = 128
TOLERANCE = 0.125
SPEED_MARGIN = 0.1
_RECORD = "_vlmtune_step_size"

Meter = Callable[[Callable[[], None], dict[str, Any]], "int | None"]
"""``meter(run, batch)``: run one probe step, return its peak memory in bytes (``None``: out of memory)."""


def cuda_peak(run: Callable[[], None], batch: dict[str, Any]) -> int | None:
    """Peak CUDA memory of ``run()``; ``None`` when it runs out of memory.

    The peak *reserved* by the caching allocator, not only allocated: a cap (``memory_limit_gib``, or what the
    device has) holds what the allocator reserves, fragmentation included, and a training run that varies its
    step's shapes from step to step fragments more than one probe step does.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        run()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return None
    return max(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())


def default_meter(model: torch.nn.Module) -> Meter | None:
    """:func:`cuda_peak` for a model on CUDA; ``None`` on the CPU, which has no peak-memory counter to read."""
    return cuda_peak if next(model.parameters()).device.type == "cuda" else None


def memory_cap_bytes(memory_limit_gib: float | None) -> int | None:
    """The cap a step must fit: ``memory_limit_gib``, else free + this process's reserved memory less the margin
    (``None`` without CUDA)."""
    if memory_limit_gib is not None:
        return int(memory_limit_gib * GIB)
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free + torch.cuda.memory_reserved() - MARGIN_GIB * GIB)


def step_size_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """What "auto" chose for the run that trained ``model`` (``None`` when nothing was auto)."""
    return model.__dict__.get(_RECORD)


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):  # Gemma-3's packed masks: a dict of 4-D masks
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class _Probe:
    """Runs probe steps on ``model`` and puts its trainable state back afterwards."""

    def __init__(self, model, make_optimizer: Callable[[], torch.optim.Optimizer], meter: Meter):
        self.model, self.make_optimizer, self.meter = model, make_optimizer, meter
        first = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = first.device, first.dtype
        # On the CPU: a copy on the device would count in the very memory being measured.
        self.saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.training = model.training

    def __call__(self, batch: dict[str, Any]) -> int | None:
        inputs = _to_device(batch, self.device)
        optimizer = self.make_optimizer()
        cuda = self.device.type == "cuda"
        autocast = cuda and self.dtype in (torch.bfloat16, torch.float16)

        def run() -> None:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=autocast):
                loss = self.model(**inputs).loss
            loss.backward()
            optimizer.step()

        self.model.train()
        try:
            return self.meter(run, inputs)
        finally:
            optimizer.zero_grad(set_to_none=True)
            self.reset()
            if cuda:
                torch.cuda.empty_cache()

    def reset(self) -> None:
        """The trainable parameters, gradients, RNG and mode as before the first probe."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.saved:
                    param.copy_(self.saved[name])
                    param.grad = None
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        self.model.train(self.training)


def check_step_config(config) -> None:
    """``TrainConfig.__post_init__``'s checks of the step-size fields; raises ``ValueError`` naming the fix."""
    if config.batch_size != AUTO and (not isinstance(config.batch_size, int) or config.batch_size < 1):
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {config.batch_size!r}")
    tokens = config.max_tokens_per_step
    if tokens is not None and not config.packing:
        raise ValueError("max_tokens_per_step is the budget of a packed step: set packing=True with it")
    if tokens is not None and tokens != AUTO and (not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"max_tokens_per_step must be >= 1, 'auto' or None, got {tokens!r}")
    if config.packing and config.batch_size == AUTO:
        raise ValueError("with packing=True a step is one packed row: use max_tokens_per_step='auto', not batch_size")
    if config.memory_limit_gib is not None and config.memory_limit_gib <= 0:
        raise ValueError(f"memory_limit_gib must be positive or None, got {config.memory_limit_gib}")
    if config.prefetch_factor < 1 or (config.dataloader_workers is not None and config.dataloader_workers < 0):
        raise ValueError("prefetch_factor must be >= 1 and dataloader_workers >= 0 (or None: the default)")


def _longest_first(prepared) -> list[int]:
    return sorted(range(len(prepared)), key=lambda i: (-prepared.lengths[i], i))


def _from_checkpoint(config, knob: str) -> int | None:
    """The value a resumed run's checkpoint recorded for ``knob`` (it was resolved when that run started)."""
    from vlmtune.checkpoints import read_record, resolve_resume

    checkpoint, _ = resolve_resume(config.resume, config.output_dir, force=config.resume_force)
    value = (read_record(checkpoint).get("fingerprint") or {}).get(f"training.{knob}") if checkpoint else None
    return value if isinstance(value, int) else None


def resolve_step_size(
    config,
    model,
    collator,
    prepared,
    make_optimizer: Callable[[], torch.optim.Optimizer],
    family=None,
    kernels: bool = False,
    meter: Meter | None = None,
):
    """``config`` with ``batch_size`` / ``max_tokens_per_step`` chosen where it says ``"auto"``.

    Args:
        config: the run's ``TrainConfig``.
        model: the tuned model (its trainable state is restored after probing).
        collator: the run's :class:`~vlmtune.data.collator.Collator`.
        prepared: the checked rows (:class:`~vlmtune.data.collator.PreparedDataset`).
        make_optimizer: a fresh optimiser of the run's kind (one per probe, dropped after it).
        family: the model's family descriptor (the kernels' patch needs it).
        kernels: probe with the run's Triton kernels on (they change the memory a step takes).
        meter: measures a probe step (default: :func:`cuda_peak` on CUDA; tests pass a fake).

    Returns:
        ``(config, record)``: the config with numbers only, and what was chosen and how (``None``: nothing was
        auto). The record is also kept on the model for :func:`vlmtune.export`.

    Raises:
        NothingFits: not even one sample fits the cap (the message names the cap and that sample's needs).
        ValueError: ``"auto"`` under a launch of several processes.
    """
    knob = "max_tokens_per_step" if config.max_tokens_per_step == AUTO else "batch_size"
    if getattr(config, knob) == AUTO and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each process would probe its own device and could pick another size: the ranks' steps must agree.
        raise ValueError(
            f"{knob}='auto' probes one device, and this launch has {os.environ['WORLD_SIZE']} processes: set "
            f"{knob} to a number (a one-process run with {knob}='auto' logs the size that fits one device)"
        )
    if getattr(config, knob) != AUTO:
        model.__dict__.pop(_RECORD, None)  # an earlier run's choice is not this run's
        return config, None
    record: dict[str, Any] = {"knob": knob}
    cap = memory_cap_bytes(config.memory_limit_gib)
    meter = meter or default_meter(model)
    resumed = _from_checkpoint(config, knob) if config.resume else None
    if resumed is not None:
        value, record["how"] = resumed, "resumed checkpoint"
    elif cap is None or meter is None:
        value = CPU_BATCH_SIZE if knob == "batch_size" else config.max_length
        record["how"] = "default without CUDA"
        logger.warning("%s='auto' without a CUDA device to measure memory on: %s=%d", knob, knob, value)
    else:
        family = family if kernels else None
        start = time.perf_counter()
        value, found = _search(config, knob, model, collator, prepared, make_optimizer, family, meter, cap)
        record.update(how="probe", memory_cap_gib=round(cap / GIB, 3), probe_s=round(time.perf_counter() - start, 1))
        record.update(found)
    record["value"] = value
    spent = f", {record['probe_s']} s" if "probe_s" in record else ""
    logger.info("%s='auto' chose %d (%s%s)", knob, value, record["how"], spent)
    model.__dict__[_RECORD] = record
    return dataclasses.replace(config, **{knob: value}), record


def _search(config, knob, model, collator, prepared, make_optimizer, family, meter, cap) -> tuple[int, dict]:
    from vlmtune.train_eval import KernelSwitch

    order = _longest_first(prepared)
    lengths = prepared.lengths
    if knob == "batch_size":
        smallest, largest, granularity = 1, min(len(prepared), MAX_BATCH), 1

        def build(size: int) -> dict[str, Any]:
            return collator([prepared[i] for i in order[:size]])

        def describe(size: int) -> str:
            return f"batch_size={size} (the longest sample, {lengths[order[0]]} tokens)"
    else:
        smallest, largest, granularity = lengths[order[0]], sum(lengths), TOKEN_GRANULARITY

        def build(size: int) -> dict[str, Any]:
            chosen, total = [], 0
            for i in order:  # the longest samples that fit: the heaviest row a budget of ``size`` can hold
                if total + lengths[i] <= size:
                    chosen.append(i)
                    total += lengths[i]
            return packer([prepared[i] for i in chosen])

        def describe(size: int) -> str:
            return f"max_tokens_per_step={size} (the longest sample alone)"

    probe = _Probe(model, make_optimizer, meter)
    usable = int(cap * HEADROOM)
    switch = KernelSwitch(model, family, enabled=family is not None)
    if knob != "batch_size":  # rows as the run builds them, which the kernels decide (its build() reads this)
        from vlmtune.compile import resolve_compile
        from vlmtune.data.packing import PackedCollator
        from vlmtune.kernels.hf.rope import packed_attention

        compiled = resolve_compile(config.compile, model) in ("language", "both")
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if family is not None:
            attn = packed_attention(model, family, compiled)
        packer = PackedCollator(collator, attn_implementation=attn)
    rates: dict[int, float] = {}

    def measure(size: int) -> int | None:
        batch = build(size)
        start = time.perf_counter()
        peak = probe(batch)
        rates[size] = batch["input_ids"].numel() / (time.perf_counter() - start)
        return peak

    try:
        found = largest_fitting(
            measure, usable, smallest, largest, granularity, describe, knob, tolerance=TOLERANCE, predict=True
        )
        chosen, how = found.size, "largest that fits"
        faster = fastest_fit(found.probes, rates, usable) if meter is cuda_peak else None
        if faster is not None and faster != chosen:
            # Timed once more each, warm (a first probe of a size can include kernel compilation).
            measure(chosen), measure(faster)
            if rates[faster] > (1 + SPEED_MARGIN) * rates[chosen]:
                logger.info(
                    "%s %d trains %.0f tokens/s, %d only %.0f", knob, faster, rates[faster], chosen, rates[chosen]
                )
                chosen, how = faster, "fastest that fits"
    except NothingFits as err:
        raise NothingFits(f"{err} (memory_limit_gib={cap / GIB:.2f}, {HEADROOM:.0%} of it usable)") from None
    finally:
        switch.off()  # the run patches its own kernels in; none stay from the probe
        probe.reset()
    probes = [[size, None if peak is None else round(peak / GIB, 3)] for size, peak in found.probes]
    peak = next(p for s, p in reversed(found.probes) if s == chosen)
    record = {"peak_gib": round(peak / GIB, 3), "probes": probes, "chosen_as": how}
    record["tokens_per_s"] = {str(size): round(rate) for size, rate in sorted(rates.items())}
    return chosen, record


def fastest_fit(probes: list[tuple[int, int | None]], rates: dict[int, float], usable: int) -> int | None:
    """The fitting probe size that trained the most tokens per second, when that beats the largest fit's rate by
    ``SPEED_MARGIN`` (``None`` otherwise).

    A step's cost is not linear in its size where attention runs over the whole step (Gemma-3's packed rows carry
    dense masks): past some size a larger step trains fewer tokens per second, and "auto" stops there.
    """
    fits = [size for size, peak in probes if peak is not None and peak <= usable]
    if not fits:
        return None
    largest, best = max(fits), max(fits, key=lambda size: (rates[size], size))
    return best if rates[best] > (1 + SPEED_MARGIN) * rates[largest] else None
