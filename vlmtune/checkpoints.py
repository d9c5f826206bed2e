"""Crash-safe checkpoints, and a resume that always finds a good one.

transformers' ``Trainer._save_checkpoint`` writes a checkpoint's files (adapter and ``modules_to_save``, optimizer,
scheduler, RNG, trainer state) into ``checkpoints/.checkpoint-N.tmp/checkpoint-N``; vlmtune then fsyncs them,
writes ``vlmtune_checkpoint.json`` last (every file with its size, the data position and the run's fingerprint)
and renames the folder to ``checkpoints/checkpoint-N``. A kill at any moment leaves the old set of checkpoints or
the new one, never a half one; old checkpoints are rotated out only once the new one is in place.

Resuming picks the newest checkpoint whose marker and files check out (transformers' own ``get_last_checkpoint``
takes the highest number, whole or not) and refuses one that a different run made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmtune.atomic import OutputWriteError, fsync_dir, fsync_tree, is_write_error, remove_tree, write_durable
from vlmtune.token_loss import TokenMeanLoss

logger = logging.getLogger(__name__)

MARKER = "vlmtune_checkpoint.json"
CHECKPOINTS = "checkpoints"
_FINAL = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_LEFTOVER = re.compile(rf"^\.{PREFIX_CHECKPOINT_DIR}-(\d+)\.(tmp|old)$")
# The files of a single-process LoRA checkpoint, named when a folder has no marker to list its own.
_EXPECTED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
_NO_MARKER = f"no {MARKER} (vlmtune writes it last: the save was cut short, or vlmtune did not write this folder)"
# Settings that change neither the data order nor the arithmetic of the next step: free to change on resume.
_FREE_TRAINING = {
    "output_dir",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "kernels",
    "dataloader_workers",
    "prefetch_factor",
    # Only "auto" reads it, and the step it chose is recorded (and reused on resume) as the step's own field.
    "memory_limit_gib",
    "report_to",
    "resume",
    "resume_force",
    "resume_from_checkpoint",
    # Evaluation and the report read the model; they change no step.
    "eval_rows",
    "eval_steps",
    "eval_samples",
    "eval_max_new_tokens",
    "best_metric",
    "report",
    "report_latex",
}
_FREE_TUNING = {"gradient_checkpointing", "vision_checkpointing", "vision_micro_batch", "embeddings_on_cpu"}
_FREE_TUNING |= {"offload_activations"}


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, or made by a different run."""


class NoCheckpointError(FileNotFoundError):
    """Nothing to resume from."""


def step_of(path: Path) -> int:
    """The optimiser step of a ``checkpoint-N`` folder."""
    return int(_FINAL.match(Path(path).name)[1])


def checkpoint_problems(path: Path) -> list[str]:
    """What keeps ``path`` from being a complete checkpoint, one phrase each (empty: complete)."""
    path = Path(path)
    if not path.is_dir():
        return ["not a folder"]
    marker = path / MARKER
    if not marker.is_file():
        return [*_missing_expected(path), _NO_MARKER]
    try:
        files = dict(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"unreadable {MARKER} ({err})"]
    problems = []
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"missing {name}")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes of {size}")
    return problems


def _missing_expected(path: Path) -> list[str]:
    problems = []
    for name in _EXPECTED:
        # A multi-process run writes one rng_state_<rank>.pth per process.
        found = list(path.glob("rng_state*.pth")) if name == "rng_state.pth" else [path / name]
        if not any(f.is_file() for f in found):
            problems.append(f"missing {name}")
        elif any(f.is_file() and f.stat().st_size == 0 for f in found):
            problems.append(f"{name} is empty")
    return problems


def read_record(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (``{}`` for a folder without one)."""
    marker = Path(path) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def scan(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in ``folder``, and a note for each unfinished or newer incomplete one."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, []
    skipped = [f"{p.name} (a save cut short)" for p in sorted(folder.iterdir()) if _LEFTOVER.match(p.name)]
    finals = sorted((p for p in folder.iterdir() if _FINAL.match(p.name) and p.is_dir()), key=step_of, reverse=True)
    for path in finals:
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append(f"{path.name} ({'; '.join(problems)})")
    return None, skipped


def resolve_resume(
    resume: bool | str | os.PathLike | None, output_dir: str, force: bool = False
) -> tuple[Path | None, list[str]]:
    """The checkpoint a run resumes from, and a note for each incomplete one passed over on the way.

    Args:
        resume: ``None`` / ``False``: a fresh run. ``True``: the newest complete checkpoint in
            ``<output_dir>/checkpoints``. A path: that checkpoint, or the newest complete one in a folder of
            checkpoints (or an output folder holding ``checkpoints/``).
        output_dir: the run's output folder.
        force: also accept a checkpoint without vlmtune's marker whose files are all there (older versions).

    Returns:
        ``(None, [])`` for a fresh run, else a complete checkpoint folder and the notes.

    Raises:
        NoCheckpointError: nothing to resume from; nothing is created.
        ResumeError: an explicit checkpoint that is incomplete, naming what is missing.
    """
    if resume is None or resume is False:
        return None, []
    if resume is True:
        return _newest(Path(output_dir) / CHECKPOINTS, f"the output folder {output_dir}")
    path = Path(resume)
    if not path.exists():
        raise NoCheckpointError(f"cannot resume: {path} does not exist")
    if not _FINAL.match(path.name) and not (path / MARKER).exists():
        folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        return _newest(folder, str(path))
    problems = checkpoint_problems(path)
    if force and problems == [_NO_MARKER]:
        logger.warning("%s has every file but no %s: taken as complete (forced)", path, MARKER)
        return path, []
    if problems:
        latest, _ = scan(path.parent)
        hint = f"; the newest complete one is {latest}" if latest is not None else ""
        raise ResumeError(f"cannot resume from {path}: it is incomplete: {', '.join(problems)}{hint}")
    return path, []


def _newest(folder: Path, where: str) -> tuple[Path, list[str]]:
    latest, skipped = scan(folder)
    if latest is None:
        notes = f"; skipped incomplete: {', '.join(skipped)}" if skipped else ""
        raise NoCheckpointError(f"cannot resume: no complete checkpoint in {where} (looked in {folder}{notes})")
    return latest, skipped


def resume_line(checkpoint: Path, skipped: list[str]) -> str:
    """The one line a resumed run starts with: which checkpoint, at which step, and what it skipped."""
    step = read_record(checkpoint).get("global_step")
    if step is None:  # a forced checkpoint without a marker
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    notes = f"; skipped incomplete: {', '.join(skipped)}" if skipped else ""
    return f"resuming from {checkpoint} (step {step}){notes}"


def run_fingerprint(model, prepared, training, tuning, world_size: int) -> dict[str, Any]:
    """What makes a run the same run: model, trainable parameters, data, and every setting that shapes a step.

    Args:
        model: the tuned model.
        prepared: the :class:`~vlmtune.data.collator.PreparedDataset` (its rows, kept indices and lengths).
        training: the ``TrainConfig`` (fields in ``_FREE_TRAINING`` are left out).
        tuning: the ``TuningConfig`` or ``None``.
        world_size: processes the batch is spread over (it changes the data each process sees).
    """
    trainable = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters() if p.requires_grad]
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record: dict[str, Any] = {
        "model": str(getattr(model.config, "name_or_path", "")),
        "trainable parameters": f"{len(trainable)} tensors, {values:,} values, sha256 {_digest(trainable)}",
        "data": _data_fingerprint(prepared),
        "world_size": world_size,
    }
    for prefix, config, free in (("training", training, _FREE_TRAINING), ("tuning", tuning, _FREE_TUNING)):
        if config is not None:
            # Field by field (not dataclasses.asdict): a free field may hold rows, which are not copied.
            fields = [f.name for f in dataclasses.fields(config) if f.name not in free]
            record.update({f"{prefix}.{k}": getattr(config, k) for k in fields})
    return json.loads(json.dumps(record, default=str))  # the form it takes in the marker, tuples as lists


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, default=str).encode()).hexdigest()[:16]


def _data_fingerprint(prepared) -> str:
    digest = hashlib.sha256()
    for index, length in zip(prepared.kept, prepared.lengths, strict=True):
        row = prepared.rows[index]
        digest.update(json.dumps([index, length, row.get("messages")], sort_keys=True, default=str).encode())
        for image in row.get("images") or []:
            digest.update(_image_bytes(image))
    return f"{len(prepared.rows)} rows ({len(prepared.kept)} kept), sha256 {digest.hexdigest()[:16]}"


def _image_bytes(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, dict):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        return bytes(image.get("bytes") or b"") or str(image.get("path")).encode()
    if isinstance(image, Image.Image):
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    return str(image).encode()  # a path: its name stands for it (reading every file would cost a pass of I/O)


def check_same_run(checkpoint: Path, fingerprint: dict[str, Any], force: bool = False) -> None:
    """Refuse to resume ``checkpoint`` when the run changed since it was saved, naming each difference.

    Keys only one side has (a setting added in a newer vlmtune) are not compared.

    Raises:
        ResumeError: something changed and ``force`` is off.
    """
    saved = read_record(checkpoint).get("fingerprint")
    if saved is None:
        logger.warning("%s records no run settings: not checked against this run", checkpoint)
        return
    changes = [
        f"{key} was {saved[key]!r}, is {fingerprint[key]!r}"
        for key in sorted(saved.keys() & fingerprint.keys())
        if saved[key] != fingerprint[key]
    ]
    if not changes:
        return
    if force:
        logger.warning("resuming from %s although the run changed (forced): %s", checkpoint, "; ".join(changes))
        return
    raise ResumeError(
        f"cannot resume from {checkpoint}: the run changed since it was saved: {'; '.join(changes)}. "
        "Resume with resume_force=True (vlmtune train --resume-force) to continue anyway, or use another output folder"
    )


def prepare_resume(training, model, prepared, tuning, world_size: int) -> tuple[str | None, dict[str, Any] | None]:
    """Resolve ``training.resume`` and check the run against it, before anything is created.

    Returns:
        The checkpoint to pass to ``Trainer.train`` (``None``: a fresh run) and the run's fingerprint to store in
        new checkpoints (``None`` when the run neither saves nor resumes).
    """
    checkpoint, skipped = resolve_resume(training.resume, training.output_dir, force=training.resume_force)
    if checkpoint is None and training.save_steps <= 0:
        return None, None
    fingerprint = run_fingerprint(model, prepared, training, tuning, world_size)
    if checkpoint is None:
        return None, fingerprint
    check_same_run(checkpoint, fingerprint, force=training.resume_force)
    (logger.warning if skipped else logger.info)(resume_line(checkpoint, skipped))
    return str(checkpoint), fingerprint


def publish(staged: Path, final: Path, record: dict[str, Any]) -> None:
    """Mark the checkpoint in ``staged`` complete, then rename it to ``final``.

    The files are fsync'd before the marker is written and the marker before the rename, so after a crash (even
    a power cut) ``final`` is either absent or whole.
    """
    files = sorted(p for p in staged.rglob("*") if p.is_file())
    record = {**record, "files": {str(p.relative_to(staged)): p.stat().st_size for p in files}}
    fsync_tree(staged)
    write_durable(staged / MARKER, json.dumps(record, indent=2, sort_keys=True) + "\n")
    fsync_dir(staged)
    aside = final.with_name(f".{final.name}.old")
    if final.exists():
        # The same step saved again (resumed from an older checkpoint): a folder cannot be renamed over a
        # non-empty one, so the old one goes aside first; a crash between the two renames loses only this step.
        remove_tree(aside)
        os.replace(final, aside)
    os.replace(staged, final)
    fsync_dir(final.parent)
    remove_tree(aside)


def rotate(folder: Path, keep: int | None, best: str | None = None) -> None:
    """Delete the oldest complete checkpoints of ``folder`` beyond the newest ``keep`` (``None``: keep all); never
    ``best``, the best checkpoint so far (``TrainConfig.best_metric``), which the run loads at its end."""
    if not keep:
        return
    complete = sorted((p for p in folder.iterdir() if _FINAL.match(p.name) and not checkpoint_problems(p)), key=step_of)
    for path in complete[:-keep]:
        if best is not None and path == Path(best):
            continue
        # The marker goes first: a kill in the middle of the deletion leaves a folder that reads as incomplete.
        try:
            (path / MARKER).unlink()
        except OSError as err:  # an old checkpoint kept is no reason to stop the run
            logger.warning("could not delete %s: %s", path, err)
            continue
        remove_tree(path)
        logger.info("deleted %s (save_total_limit=%d)", path, keep)


class CheckpointTrainer(TokenMeanLoss, Trainer):
    """transformers' ``Trainer`` whose checkpoints are written whole or not at all (see the module docstring), and
    whose loss is the mean over the supervised tokens of the step (:mod:`vlmtune.token_loss`).

    Args:
        fingerprint: :func:`run_fingerprint` of the run, stored in each checkpoint.
        save_total_limit: complete checkpoints to keep (``None``: all).
    """

    def __init__(self, *args, fingerprint: dict[str, Any] | None = None, save_total_limit=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fingerprint = fingerprint
        self._keep = save_total_limit
        self._staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, transformers' save code puts its `checkpoint-N` in the staging folder:
        # `_save_checkpoint` builds every path from this in 5.17 to 5.25 (read in their trainer.py).
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = folder / f".{name}.tmp"
        main = self.args.should_save
        try:
            if main:
                for leftover in (p for p in folder.glob(".*") if _LEFTOVER.match(p.name)):
                    remove_tree(leftover)  # from a run killed mid-save: no complete checkpoint lives there
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()  # every process writes its RNG state into the staging folder
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if main and not (staging / name).is_dir():
                raise RuntimeError(
                    f"transformers {transformers.__version__} no longer writes checkpoints under "
                    "Trainer._get_output_dir, which vlmtune's crash-safe checkpoints rely on (5.17 to 5.25 do)"
                )
            if main:
                self._unstage_best(staging, folder)
                publish(staging / name, folder / name, self._record())
                remove_tree(staging)
        except (OSError, RuntimeError) as err:
            if not is_write_error(err):
                raise
            raise self._write_error(folder, folder / name, staging if main else None, err) from err
        if main:
            rotate(folder, self._keep, self.state.best_model_checkpoint)

    def _unstage_best(self, staging: Path, folder: Path) -> None:
        # transformers records the best checkpoint (metric_for_best_model) under the folder it was written to: the
        # staging one. Point the record at the checkpoint's final place, in the state and in the staged file.
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:
            self.state.best_model_checkpoint = str(folder / Path(best).name)
            self.state.save_to_json(str(staging / Path(best).name / TRAINER_STATE_NAME))

    def _record(self) -> dict[str, Any]:
        from vlmtune import __version__

        args, state = self.args, self.state
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return {
            "format": 1,
            "vlmtune": __version__,
            "global_step": state.global_step,
            "data_position": {"epoch": state.epoch, "samples_seen": state.global_step * per_step},
            "fingerprint": self._fingerprint,
        }

    @staticmethod
    def _write_error(folder: Path, final: Path, staging: Path | None, err: BaseException) -> OutputWriteError:
        if staging is not None:
            remove_tree(staging)  # give back the space the partial save took
        latest, _ = scan(folder)
        last = f"the last good checkpoint is {latest}" if latest is not None else "no complete checkpoint yet"
        reason = " ".join(str(err).split())  # torch's writer errors span lines
        error = OutputWriteError(
            f"could not write checkpoint {final}: {reason}; {last} "
            "(free space or fix permissions, then resume with --resume)"
        )
        error.errno = getattr(err, "errno", None)
        return error
