"""Save what a run made: LoRA adapter + processor (+ chat template) + the recipe; merge to 16-bit on demand.

The adapter records its base as an absolute path, and ``vlmtune.json`` the base's ``model_type``.
:func:`load_exported` reloads any family's export with the family's own loader. Where transformers has the
family's classes (Qwen-VL, Gemma-3, MiniCPM-V 4.6), the folder also loads with plain ``transformers`` + ``peft``,
no vlmtune import::

    base = AutoModelForImageTextToText.from_pretrained(BASE)
    model = PeftModel.from_pretrained(base, OUT)
    processor = AutoProcessor.from_pretrained(OUT)

MiniCPM-V 2.6 / 4.x in the released layout has no transformers class: its exports load through vlmtune
(:func:`load_exported`, or :class:`~vlmtune.families.minicpmv.modeling.MiniCPMV` + ``PeftModel`` +
:class:`~vlmtune.families.minicpmv.processing.MiniCPMVProcessor`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from vlmtune.atomic import OutputWriteError, fsync_tree, is_write_error, remove_tree, replace_files

logger = logging.getLogger(__name__)

_PACKAGES = ("vlmtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "tokenizers")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (``None`` where one is missing)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def jsonable(obj: Any) -> Any:
    """``obj`` (dataclasses, dicts, lists, scalars) as JSON values; anything else as its ``str``.

    A dataclass field with ``metadata={"record": "length"}`` (``TrainConfig.eval_rows``) is recorded as its
    length: a config keeps the rows it was handed, and a record of a run must not copy a dataset.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _field_record(f, getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _field_record(spec: dataclasses.Field, value: Any) -> Any:
    if spec.metadata.get("record") == "length":
        return None if value is None else {"rows": len(value)}
    return jsonable(value)


def export(model, processor, out: str | Path, recipe: Any = None, base_model: str | None = None) -> Path:
    """Write ``adapter_model.safetensors``, ``adapter_config.json``, the processor files and ``vlmtune.json``.

    The files are written to ``out/.export.tmp`` first and moved into ``out`` only when all are whole, so a
    failure (a full disk) leaves the previous export as it was. Other files in ``out`` (``checkpoints/``, the
    user's own) are never touched. In a multi-process run the process of rank 0 writes and the others wait for it.

    Args:
        model: the trained ``PeftModel``.
        processor: the processor used in training (saved with its chat template).
        out: export folder (created).
        recipe: the run's configuration (dataclasses or dicts), recorded in ``vlmtune.json``.
        base_model: path recorded as the adapter's base model (defaults to the one the model was loaded from).

    Raises:
        OutputWriteError: ``out`` could not be written (the message names it and the last good checkpoint).
    """
    out = Path(out)
    for config in model.peft_config.values():
        config.base_model_name_or_path = _base_record(base_model or config.base_model_name_or_path)
    base = next(iter(model.peft_config.values())).base_model_name_or_path
    record = {
        "recipe": jsonable(recipe),
        "versions": package_versions(),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "base_model_source": "local" if Path(base).is_dir() else "hub",
    }
    from vlmtune.step_probe import step_size_of

    if step_size_of(model) is not None:  # what batch_size / max_tokens_per_step="auto" chose, and how
        record["step_size"] = step_size_of(model)
    if _distributed():
        # Every rank holds the same adapter (DDP) or a shard of it (FSDP2: every rank gathers it whole first);
        # one writer keeps the staging folder to itself.
        state = _gathered(model)
        if torch.distributed.get_rank() == 0:
            _write_export(model, processor, out, record, state)
        torch.distributed.barrier()
    else:
        _write_export(model, processor, out, record)
    logger.info("exported adapter and processor to %s", out.resolve())
    return out


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gathered(model) -> dict[str, torch.Tensor] | None:
    """The whole trainable state of a model sharded by FSDP2 (a collective), ``None`` for a replicated one."""
    from torch.distributed.tensor import DTensor

    from vlmtune.distributed import trainable_state_dict

    return trainable_state_dict(model) if any(isinstance(p, DTensor) for p in model.parameters()) else None


def _write_export(model, processor, out: Path, record: dict[str, Any], state: dict | None = None) -> None:
    staging = out / ".export.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_tree(staging)  # left by an export that was killed
        staging.mkdir()
        if (out / "README.md").is_file():
            shutil.copy2(out / "README.md", staging / "README.md")  # peft updates an existing model card
        model.save_pretrained(staging, safe_serialization=True, **({"state_dict": state} if state else {}))
        processor.save_pretrained(staging)
        (staging / "vlmtune.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        fsync_tree(staging)
        replace_files(staging, out, last="vlmtune.json")
    except (OSError, RuntimeError) as err:
        if not is_write_error(err):
            raise
        raise _write_error(out, err) from err
    finally:
        remove_tree(staging)


def _write_error(out: Path, err: BaseException) -> OutputWriteError:
    from vlmtune.checkpoints import CHECKPOINTS, scan

    latest, _ = scan(out / CHECKPOINTS)
    last = f"; the last good checkpoint is {latest}" if latest is not None else ""
    reason = " ".join(str(err).split())
    error = OutputWriteError(f"could not write the export to {out}: {reason}; its previous files are unchanged{last}")
    error.errno = getattr(err, "errno", None)
    return error


def _base_record(base: str | Path) -> str:
    """A local base folder as its absolute path (so the export works from any folder); anything else as given."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else str(base)


def base_of(out: str | Path) -> Path:
    """The base checkpoint an export was trained on, as a local folder; a clear error when it is not one.

    Raises:
        FileNotFoundError: ``out`` is not an export, or the recorded base is not a folder here (the hub is only
            asked for a base trained from a hub id: a folder that moved must be named again, with
            ``base_model`` / ``--base``).
    """
    from vlmtune.loading import checkpoint_folder

    config = Path(out) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(out)!r} holds no adapter_config.json; is it a folder an export wrote?")
    recorded = json.loads(config.read_text()).get("base_model_name_or_path")
    if not recorded:
        raise FileNotFoundError(f"{config} records no base model; pass the base checkpoint folder (--base)")
    record = Path(out) / "vlmtune.json"
    from_hub = record.is_file() and json.loads(record.read_text()).get("base_model_source") == "hub"
    try:
        return checkpoint_folder(recorded, what="base model folder", hub=from_hub)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise FileNotFoundError(f"{err}, as recorded in {config}; pass the base checkpoint folder (--base)") from err


def load_exported(
    out: str | Path, base_model: str | Path | None = None, dtype: torch.dtype | None = None, device: str | None = None
):
    """Load an export for inference: ``(model, processor)``, the base through its family's loader.

    Args:
        out: the export folder.
        base_model: the base checkpoint folder (default: the one the export records, see :func:`base_of`).
        dtype: weights dtype (default: the checkpoint's).
        device: ``"cuda"``, ``"cpu"`` ... (default: CUDA when present).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.families import detect
    from vlmtune.loading import checkpoint_folder, read_config
    from vlmtune.quiet import peft_wrapping

    base = checkpoint_folder(base_model, what="base model folder") if base_model is not None else base_of(out)
    family = detect(read_config(base))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = (family.load_model or AutoModelForImageTextToText.from_pretrained)(
        base, dtype=dtype or "auto", device_map=device
    )
    processor = (family.load_processor or AutoProcessor.from_pretrained)(out)
    with peft_wrapping():
        return PeftModel.from_pretrained(model, out), processor


def merge(out: str | Path, merged: str | Path, base_model: str | Path | None = None, dtype=torch.bfloat16) -> Path:
    """Merge an exported adapter into its base in 16-bit and save a full checkpoint (+ processor) to ``merged``.

    The base is reloaded unquantised (merging into 4-bit weights would round the update away).
    """
    model, processor = load_exported(out, base_model, dtype=dtype)
    full = model.merge_and_unload()
    full.save_pretrained(merged, safe_serialization=True)
    processor.save_pretrained(merged)
    if getattr(full.config, "auto_map", None):
        # A released MiniCPM-V 2.6 folder names its remote code in `auto_map`; the merged config keeps that, so
        # the code must sit beside it for `trust_remote_code=True` users (vlmtune itself never runs it).
        base = Path(base_model) if base_model is not None else base_of(out)
        for code in base.glob("*.py"):
            shutil.copy2(code, Path(merged) / code.name)
    logger.info("merged %s into a %s checkpoint at %s", out, dtype, Path(merged).resolve())
    return Path(merged)
