"""Save what a run made: LoRA adapter + processor (+ chat template) + the recipe; merge to 16-bit on demand.

The export folder loads with plain ``transformers`` + ``peft``, no vlmtune import::

    base = AutoModelForImageTextToText.from_pretrained(BASE)
    model = PeftModel.from_pretrained(base, OUT)
    processor = AutoProcessor.from_pretrained(OUT)
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
    if base_model is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_model)
    if _distributed():
        # Every rank holds the same adapter; one writer keeps the staging folder to itself.
        if torch.distributed.get_rank() == 0:
            _write_export(model, processor, out, recipe)
        torch.distributed.barrier()
    else:
        _write_export(model, processor, out, recipe)
    logger.info("exported adapter and processor to %s", out)
    return out


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _write_export(model, processor, out: Path, recipe: Any) -> None:
    staging = out / ".export.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_tree(staging)  # left by an export that was killed
        staging.mkdir()
        if (out / "README.md").is_file():
            shutil.copy2(out / "README.md", staging / "README.md")  # peft updates an existing model card
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        record = {"recipe": jsonable(recipe), "versions": package_versions()}
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


def load_exported(out: str | Path, base_model: str | Path | None = None, dtype: torch.dtype | None = None):
    """Load an export with plain transformers + peft: ``(model, processor)``."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base_model = base_model or PeftConfig.from_pretrained(out).base_model_name_or_path
    base = AutoModelForImageTextToText.from_pretrained(base_model, dtype=dtype or "auto")
    return PeftModel.from_pretrained(base, out), AutoProcessor.from_pretrained(out)


def merge(out: str | Path, merged: str | Path, base_model: str | Path | None = None, dtype=torch.bfloat16) -> Path:
    """Merge an exported adapter into its base in 16-bit and save a full checkpoint (+ processor) to ``merged``.

    The base is reloaded unquantised (merging into 4-bit weights would round the update away).
    """
    model, processor = load_exported(out, base_model, dtype=dtype)
    full = model.merge_and_unload()
    full.save_pretrained(merged, safe_serialization=True)
    processor.save_pretrained(merged)
    logger.info("merged %s into a %s checkpoint at %s", out, dtype, merged)
    return Path(merged)
