"""Load a local checkpoint as model + processor + family, in 16-bit or quantised.

model, processor, family = vlmtune.load("path/to/checkpoint", quant="nf4")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from packaging.version import Version

from vlmtune.distributed.rank0_load import empty_load_refusal, empty_model
from vlmtune.families import Family, detect
from vlmtune.hub import hub_snapshot, is_hub_id

logger = logging.getLogger(__name__)

QUANTS = ("none", "nf4", "int8")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(dtype: str = "auto") -> torch.dtype:
    """``"auto"``: bf16 on a CUDA device that has it, fp16 on one that does not, fp32 on the CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(family: Family, quant: str, dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8):
    """The bitsandbytes config that quantises the language tower's linears only.

    The vision tower, projector and ``lm_head`` stay in the compute dtype: they are a small share of the weights,
    and quantising them costs accuracy (SigLIP / ViT features) for little memory. ``quant_storage`` is the dtype
    the packed 4-bit values are stored in (the same bytes either way; FSDP2 shards only a float storage).
    """
    from transformers import BitsAndBytesConfig

    keep = [*family.towers["vision"], *family.towers["projector"], "lm_head"]
    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage,
            llm_int8_skip_modules=keep,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def read_config(path: Path) -> SimpleNamespace:
    """The folder's ``config.json`` as attributes, read without transformers' Auto classes.

    The family is decided from ``model_type`` before any class is chosen: a MiniCPM-V 2.6 folder names remote code
    in its ``auto_map``, which must not be followed unless the user opts in.
    """
    config = path / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it a checkpoint folder?")
    return SimpleNamespace(**json.loads(config.read_text()))


def checkpoint_folder(name: str | Path, what: str = "checkpoint folder", hub: bool = True) -> Path:
    """The absolute path of a local checkpoint folder, or with ``hub`` of a hub id's folder in the HF cache.

    The absolute path is what transformers records as ``name_or_path`` (and PEFT as the adapter's base model), so
    an export names its base in a way that holds from any working directory.

    Raises:
        FileNotFoundError: naming ``name`` when it is neither (see :func:`vlmtune.hub.hub_snapshot`).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise NotADirectoryError(f"{what} {str(name)!r} is a file, not a folder")
    if hub and is_hub_id(str(name)):
        return hub_snapshot(str(name))
    raise FileNotFoundError(f"{what} {str(name)!r} does not exist (looked for {path.absolute()})")


def _is_prequantized(path: Path) -> bool:
    config = path / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def _default_device() -> str:
    """CUDA when present: under a launcher this process's own GPU (``LOCAL_RANK``), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    # A 4-bit model cannot be moved after loading (bitsandbytes): each rank must load onto its own GPU.
    return f"cuda:{local_rank}" if local_rank is not None else "cuda"


def _quant_storage(name: str, dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return dtype if int(os.environ.get("WORLD_SIZE", "1")) > 1 else torch.uint8
    if name == "uint8":
        return torch.uint8
    if name not in DTYPES:
        raise ValueError(f"quant_storage must be 'auto', 'uint8' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _loads_empty(family: Family, quantised: bool) -> bool:
    """Whether this rank builds an empty model: under a launcher of several processes, on ranks above 0."""
    from vlmtune.distributed.launch import launched_world_size, rank

    if launched_world_size() <= 1:
        return False
    refusal = empty_load_refusal(family, quantised)
    if refusal is not None:
        if rank() == 0:
            logger.info("empty_on_other_ranks: %s", refusal)
        return False
    return rank() > 0


def load(
    path: str | Path,
    quant: str = "none",
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str = "sdpa",
    quant_storage: str = "auto",
    empty_on_other_ranks: bool = False,
):
    """Load a checkpoint folder for fine-tuning.

    Args:
        path: local checkpoint folder (config, weights, processor files), or a hub id
            (``"Qwen/Qwen2.5-VL-7B-Instruct"``) read through the Hugging Face cache (see :mod:`vlmtune.hub`).
        quant: ``"none"`` (weights in ``dtype``), ``"nf4"`` (QLoRA: 4-bit NF4 with double quantisation on the
            language tower's linears) or ``"int8"``. A pre-quantised checkpoint (its config has a
            ``quantization_config``) loads as it is, whatever ``quant`` says.
        dtype: compute dtype, ``"auto"`` (see :func:`compute_dtype`), ``"bfloat16"``, ``"float16"`` or
            ``"float32"``.
        device: ``"cuda"``, ``"cpu"`` ...; default CUDA when present.
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
        quant_storage: dtype that holds the packed NF4 values: ``"auto"`` is the compute dtype under a launcher of
            several processes (what FSDP2 can shard; DDP takes it too) and ``uint8`` in one process;
            ``"uint8"`` or a name of :data:`DTYPES` forces one.
        empty_on_other_ranks: under a launcher of several processes, build the model on the meta device on every
            rank but 0 (no weight read or allocated there) for ``TrainConfig(distributed="fsdp")`` to fill from
            rank 0 once sharded (:mod:`vlmtune.distributed.rank0_load`). Quantised models, and families with
            their own loader, still load on every rank (logged). Off by default: an empty model trains only
            under FSDP2.

    Returns:
        ``(model, processor, family)``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    given, path = str(path), checkpoint_folder(path)
    family = detect(read_config(path))
    torch_dtype = compute_dtype(dtype)
    device = device or _default_device()
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation, "device_map": device}
    if Version(transformers.__version__) >= Version("5.25"):
        # From 5.25 transformers kernelises layers with the `kernels` library whenever it is installed (use_kernels
        # None means on; it was False before), fetching kernels from the Hub: vlmtune loads offline, with its own.
        kwargs["use_kernels"] = False
    if quant != "none" and not _is_prequantized(path):
        storage = _quant_storage(quant_storage, torch_dtype)
        kwargs["quantization_config"] = quantization_config(family, quant, torch_dtype, storage)
    if empty_on_other_ranks and _loads_empty(family, "quantization_config" in kwargs or _is_prequantized(path)):
        model = empty_model(path, torch_dtype, attn_implementation)
        device = "meta"
    else:
        loader = family.load_model or AutoModelForImageTextToText.from_pretrained
        model = loader(path, **kwargs)
    if is_hub_id(given) and not Path(given).is_dir():
        model.name_or_path = given  # what an export records as its base: the hub id holds on any machine
    processor = (family.load_processor or AutoProcessor.from_pretrained)(path)
    logger.info("loaded %s (%s, %s, quant=%s) on %s", path, family.name, torch_dtype, quant, device)
    return model, processor, family
