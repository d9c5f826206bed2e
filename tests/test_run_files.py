"""The run's jsonl / json files: appended whole, read back past a torn last line, cut back to a checkpoint's step."""

import pytest

from vlmtune import run_files


def test_lines_are_appended_and_read_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert run_files.read_lines(path) == []
    for step in (1, 2):
        run_files.append_line(path, {"step": step, "loss": 1.0 / step})
    assert run_files.read_lines(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_a_torn_last_line_is_skipped_and_a_torn_middle_line_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a SIGKILL in the middle of a write
    assert run_files.read_lines(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run_files.read_lines(path)


def test_keep_through_drops_the_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (0, 1, 2, 2, 3, 4):
        run_files.append_line(path, {"step": step})
    assert [r["step"] for r in run_files.keep_through(path, 2)] == [0, 1, 2, 2]
    assert [r["step"] for r in run_files.read_lines(path)] == [0, 1, 2, 2]
    assert run_files.keep_through(path, -1) == [] and path.read_text() == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_json_is_replaced_atomically(tmp_path):
    path = tmp_path / "run.json"
    run_files.write_json(path, {"a": 1})
    run_files.write_json(path, {"a": 2})
    assert run_files.read_json(path) == {"a": 2} and run_files.read_json(tmp_path / "none.json") == {}
