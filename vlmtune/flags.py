"""Command-line flags generated from config dataclasses, so a parser never restates a default.

Every field of a config (and of the configs nested in it) becomes one ``--flag``: its type gives the argparse
type (``Literal[...]`` gives the choices, ``bool`` a ``--x / --no-x`` pair, ``list`` several values, ``dict`` a
JSON object), its value in a default *instance* gives the default, and the class docstring's Google-style
``Attributes:`` entry gives the help. A nested config is one help group; its fields keep their own names
(``--max-steps``, not ``--training.max-steps``), and two fields of the same name are refused when the parser
is built.

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_config_flags(parser, LatexOcrConfig(), skip={"training.output_dir"}, required={"model"})
    config = config_from_args(LatexOcrConfig(), parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from typing import Any, Literal

_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # Sphinx roles such as :class:`~vlmtune.TuningConfig`
_ENTRY = re.compile(r"^(\w+(?:\s*/\s*\w+)*):\s*(.*)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout (a recipe's docstring) and appends each flag's default to its help."""


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Attributes:`` section of ``cls``'s docstring (``a / b: text`` documents both).

    Continuation lines (indented deeper than the entry) join the entry; reST markup is reduced to plain text.
    """
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    entry_indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if entry_indent is None:
            entry_indent = indent
        if indent < entry_indent:
            break  # the next section
        match = _ENTRY.match(line.strip())
        if indent == entry_indent and match:
            names = [n.strip() for n in match.group(1).split("/")]
            for name in names:
                docs[name] = match.group(2)
        elif names:
            for name in names:
                docs[name] += " " + line.strip()
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    # argparse expands "%" in help strings; a literal one must be doubled.
    return _ROLE.sub(r"\1", text).replace("``", "").replace("%", "%%")


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _without_none(hint: Any) -> Any:
    """``X | None`` → ``X``; ``X | Y (| None)`` → ``(X, Y)``; any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(hint) if a is not type(None))
        return args[0] if len(args) == 1 else args
    return hint


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} ({err.msg})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _str_or_bool(text: str) -> str | bool:
    words = {"true": True, "yes": True, "false": False, "no": False}
    return words.get(text.lower(), text)


def _int_or(words: tuple[str, ...]):
    def parse(text: str) -> int | str:
        if text in words:
            return text
        try:
            return int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer or one of {list(words)}, got {text!r}") from err

    parse.__name__ = "int"  # argparse names the type in its error messages
    return parse


def _argument(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for one field of type ``hint``."""
    hint = _without_none(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(hint)
        return {"type": type(choices[0]), "choices": choices}
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return {"type": item, "nargs": "*", "metavar": item.__name__.upper()}
    if hint is dict or origin is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if hint in (int, float, str):
        return {"type": hint, "metavar": hint.__name__.upper()}
    if isinstance(hint, tuple) and len(hint) == 2 and int in hint:
        (words,) = (h for h in hint if h is not int)
        if typing.get_origin(words) is Literal:
            # `--batch-size 8` or `--batch-size auto`.
            return {"type": _int_or(typing.get_args(words)), "metavar": "INT|" + "|".join(typing.get_args(words))}
    if isinstance(hint, tuple) and set(hint) == {str, bool}:
        # `--resume` alone means True (the newest), `--resume PATH` a path.
        return {"type": _str_or_bool, "nargs": "?", "const": True, "metavar": "PATH"}
    raise TypeError(f"no command-line flag for a field of type {hint!r}; give it a simpler type or skip it")


def add_config_flags(
    parser: argparse.ArgumentParser,
    default: Any,
    skip: set[str] | frozenset[str] = frozenset(),
    required: set[str] | frozenset[str] = frozenset(),
    prefix: str = "",
    seen: dict[str, str] | None = None,
) -> None:
    """Add one flag per field of the config instance ``default`` (and of the configs nested in it).

    Args:
        parser: the parser (or argument group) to add to.
        default: an instance whose values are the defaults shown and used.
        skip: dotted field paths left out (``"training.output_dir"``).
        required: dotted field paths the user must give.
        prefix: the dotted path of ``default`` inside the outer config (set by the recursion).
        seen: flag → field path, to refuse two fields that would share a flag (set by the recursion).
    """
    seen = {} if seen is None else seen
    cls = type(default)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    summary = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(f"{prefix.rstrip('.') or 'recipe'} ({cls.__name__})", summary)
    nested = []
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        value = getattr(default, field.name)
        if path in skip or not field.init:
            continue
        if _is_config(value):
            nested.append((path, value))
            continue
        flag = "--" + field.name.replace("_", "-")
        if flag in seen:
            raise ValueError(f"{path} and {seen[flag]} would both be {flag}; skip one of them")
        seen[flag] = path
        kwargs = _argument(hints[field.name], value)
        help_text = docs.get(field.name, "")
        if path in required:
            kwargs["required"] = True
            help_text += " (required)"
        else:
            kwargs["default"] = value
        group.add_argument(flag, dest=path, help=help_text or " ", **kwargs)
    for path, value in nested:
        add_config_flags(parser, value, skip, required, prefix=path + ".", seen=seen)


def config_from_args(default: Any, args: argparse.Namespace, prefix: str = "") -> Any:
    """A new config like ``default`` with every value the parser holds for it (nested configs rebuilt too).

    The config's ``__post_init__`` runs, so an invalid value raises its ``ValueError`` naming the fix.
    """
    values = vars(args)
    changes = {}
    for field in dataclasses.fields(default):
        path = prefix + field.name
        value = getattr(default, field.name)
        if _is_config(value):
            changes[field.name] = config_from_args(value, args, prefix=path + ".")
        elif field.init and path in values:
            changes[field.name] = values[path]
    return dataclasses.replace(default, **changes)
