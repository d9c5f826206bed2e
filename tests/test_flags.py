"""Flags generated from config dataclasses: types, choices, defaults from the instance, help from the docstring."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from vlmtune.flags import HelpFormatter, add_config_flags, config_from_args, field_docs


@dataclass
class Inner:
    """Inner knobs.

    Attributes:
        mode: how it runs: ``"a"`` or ``"b"``
            (the second line joins the first).
        lo / hi: the bounds, 50% each.
        names: several names.
        options: a JSON object.
        resume: a path, or ``True`` for the latest.
        fast: go fast (``None``: decide alone).
    """

    mode: Literal["a", "b"] = "a"
    lo: float | None = None
    hi: float | None = None
    names: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    resume: str | bool | None = None
    fast: bool | None = None

    def __post_init__(self):
        if self.lo is not None and self.lo < 0:
            raise ValueError(f"lo must be >= 0, got {self.lo}")


@dataclass
class Outer:
    """Outer knobs.

    Attributes:
        model: the model folder.
        steps: how many steps.
        inner: the inner config.
    """

    model: str = ""
    steps: int = 3
    inner: Inner = field(default_factory=lambda: Inner(mode="b"))


def _parse(argv, default=None):
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_config_flags(parser, default or Outer(), required={"model"})
    return config_from_args(default or Outer(), parser.parse_args(argv)), parser


def test_docstring_entries_become_help():
    docs = field_docs(Inner)
    assert docs["mode"] == 'how it runs: "a" or "b" (the second line joins the first).'
    assert docs["lo"] == docs["hi"] == "the bounds, 50%% each."  # argparse expands a single %


def test_defaults_come_from_the_instance_and_values_from_the_flags():
    config, _ = _parse(["--model", "m"])
    assert config == Outer(model="m", steps=3, inner=Inner(mode="b"))
    config, _ = _parse(
        ["--model", "m", "--steps", "7", "--mode", "a", "--lo", "0.5", "--names", "x", "y", "--options", '{"k": 1}']
        + ["--resume", "true", "--no-fast"]
    )
    assert config.steps == 7 and isinstance(config.inner, Inner)
    assert (config.inner.mode, config.inner.lo, config.inner.names, config.inner.options) == (
        "a",
        0.5,
        ["x", "y"],
        {"k": 1},
    )
    assert config.inner.resume is True and config.inner.fast is False
    assert _parse(["--model", "m", "--resume", "ckpt/7"])[0].inner.resume == "ckpt/7"


def test_choices_required_and_invalid_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--mode", "c"])
    assert "invalid choice: 'c' (choose from 'a', 'b')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([])
    assert "the following arguments are required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--options", "[1]"])
    assert "not a JSON object" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lo must be >= 0, got -1.0"):
        _parse(["--model", "m", "--lo", "-1"])


def test_help_shows_defaults_and_choices():
    _, parser = _parse(["--model", "m"])
    text = " ".join(parser.format_help().split())
    assert "--mode {a,b} how it runs" in text and "(default: b)" in text
    assert "--fast, --no-fast" in text and "--steps INT how many steps. (default: 3)" in text


def test_two_fields_sharing_a_flag_are_refused():
    @dataclass
    class Clash:
        steps: int = 1
        outer: Outer = field(default_factory=Outer)

    with pytest.raises(ValueError, match="outer.steps and steps would both be --steps"):
        add_config_flags(argparse.ArgumentParser(), Clash())
