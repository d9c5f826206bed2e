"""All-or-nothing writes: the file swap of an export, and telling a failed write from a bug."""

import os
from pathlib import Path

from vlmtune.atomic import is_write_error, replace_files


def test_torch_writer_failures_are_write_errors_and_other_runtime_errors_are_not():
    # torch's zip writer reports a failed write (ENOSPC included) as a RuntimeError; these are torch 2.14's two
    # messages (libtorch_cpu's inline_container.cc).
    assert is_write_error(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert is_write_error(OSError(28, "No space left on device"))
    assert not is_write_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_write_error(ValueError("PytorchStreamWriter"))


def test_replace_files_swaps_in_every_file_the_named_one_last_and_leaves_the_rest(tmp_path, monkeypatch):
    staged, target = tmp_path / "out" / ".export.tmp", tmp_path / "out"
    (staged / "sub").mkdir(parents=True)
    for name, text in {"a.json": "new a", "z.bin": "new z", "record.json": "new record", "sub/b.txt": "new b"}.items():
        (staged / name).write_text(text)
    (target / "a.json").write_text("old a")
    (target / "mine.txt").write_text("the user's")
    order = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), replace(src, dst)))
    moved = replace_files(staged, target, last="record.json")
    assert order == ["a.json", "b.txt", "z.bin", "record.json"]
    assert [str(p) for p in moved] == ["a.json", "sub/b.txt", "z.bin", "record.json"]
    assert (target / "a.json").read_text() == "new a" and (target / "sub" / "b.txt").read_text() == "new b"
    assert (target / "mine.txt").read_text() == "the user's"
    assert not (tmp_path / "out" / ".export.tmp.old").exists()
