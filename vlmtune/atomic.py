"""Writes that a crash or a full disk cannot leave half done: fsync helpers and an all-or-nothing file swap.

A rename within one filesystem is atomic, and after an fsync of the files and of the folders that hold them it
is also durable: checkpoints and exports are written to a staging folder beside their final place and renamed
in only when whole (:mod:`vlmtune.checkpoints`, :func:`vlmtune.export.export`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class OutputWriteError(OSError):
    """A checkpoint or an export could not be written (disk full, no permission ...); nothing good was replaced."""


def is_write_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed write, not a bug: an ``OSError``, or the ``RuntimeError`` of torch's writer.

    ``torch.save`` reports a write that fails (``ENOSPC`` included) from its C++ zip writer as a ``RuntimeError``
    ("PytorchStreamWriter failed writing file ...", "[enforce fail at inline_container.cc ...] unexpected pos"),
    not as an ``OSError`` (torch 2.14).
    """
    if isinstance(err, OSError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (before it is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_tree(path: Path) -> None:
    """Delete a folder vlmtune made (staging, a rotated checkpoint); a failure is logged, never raised."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.warning("could not remove %s: %s", path, err)


def _relative_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def replace_files(staged: Path, target: Path, last: str | None = None) -> list[Path]:
    """Move every file of ``staged`` into ``target`` (same filesystem), replacing files of the same names.

    Other files in ``target`` are left alone: it can be a user's folder. The new files are already whole (written
    and fsync'd in ``staged``); what is left to fail is the sequence of renames, so each replaced file is first
    hard-linked aside and, should a rename fail, the old files are put back: ``target`` then holds its old set.
    ``last`` (a file name) is moved last, so it can serve as the record that the set is complete.

    Returns:
        The relative paths moved.
    """
    names = _relative_files(staged)
    names.sort(key=lambda p: str(p) == last)
    backup = staged.with_name(staged.name + ".old")
    remove_tree(backup)
    for name in names:
        if (target / name).is_file():
            (backup / name).parent.mkdir(parents=True, exist_ok=True)
            _keep_aside(target / name, backup / name)
    moved: list[Path] = []
    try:
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / name, target / name)
            moved.append(name)
        fsync_dir(target)
    except OSError:
        for name in reversed(moved):
            if (backup / name).exists():
                os.replace(backup / name, target / name)
            else:
                os.unlink(target / name)
        raise
    finally:
        remove_tree(backup)
    return names


def _keep_aside(path: Path, aside: Path) -> None:
    # A hard link keeps the old bytes without copying them; filesystems without links (FAT, some network mounts)
    # get a copy.
    try:
        os.link(path, aside)
    except OSError:
        shutil.copy2(path, aside)
