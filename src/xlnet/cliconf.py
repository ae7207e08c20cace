"""Dataclass configs as CLI flags and YAML files: `--config run.yaml --lr 1e-4` means the same as YAML keys.

Precedence: dataclass defaults < YAML file < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from xlnet.errors import XLNetError

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """int | None -> int; Optional[str] -> str; Literal -> type of its first value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    return tp


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_FIELD = re.compile(r"^\s+(\w+)\s*:[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (its line's trailing comment, else the comment lines right above
    it), for base classes too: the text of `--help`. Empty where the source cannot be read."""
    comments: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD.match(line)
            if match and match[1] in klass.__annotations__:
                text = match[2] or " ".join(above)
                if text:
                    comments[match[1]] = text
            above = []
    return comments


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field, its help the field's comment; defaults stay None so we can tell what the
    user set."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    group = parser.add_argument_group(f"{cls.__name__} (also settable in --config YAML)")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = repr(default) if default == "" else default
        text = (comments.get(f.name, "") + f" (default {shown})").strip().replace("%", "%%")  # argparse formats %
        if tp is bool:
            group.add_argument(flag, type=parse_bool, default=None, metavar="BOOL", help=text)
        elif tp in (int, float, str):
            literal = typing.get_origin(hints[f.name]) is typing.Literal
            group.add_argument(flag, type=tp, default=None, help=text,
                               choices=typing.get_args(hints[f.name]) if literal else None)
        elif typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(flag, type=item, nargs="+", default=None, help=text)


def build_dataclass(cls: type[T], config_path: str | None = None, args: argparse.Namespace | None = None,
                    **fixed: Any) -> T:
    """Defaults, then the YAML file, then flags that were given, then `fixed` values."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if config_path:
        values.update(read_yaml(config_path, names))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    values.update(fixed)
    values = typed_values(cls, values, config_path or cls.__name__)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise XLNetError(f"invalid {cls.__name__}: {e}") from None


def typed_values(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` for the dataclass `cls` as its fields' types, from what YAML or JSON gave: an XLNetError naming
    `source` and the field for a value that is not of its type. YAML's own slips are taken: `1e-3` (a string to
    PyYAML) as a float, `"no"` as a boolean, 1000.0 as an integer."""
    hints = typing.get_type_hints(cls)
    return {k: _typed(hints[k], v, f"{source}: {k}") if k in hints else v for k, v in values.items()}


def _typed(tp: Any, value: Any, where: str) -> Any:
    optional = type(None) in typing.get_args(tp)
    if value is None and optional:
        return None
    base = _base_type(tp)
    literal = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
    if base is bool:
        out = _as_bool(value)
    elif base is int:
        out = _as_number(value, integral=True)
    elif base is float:
        out = _as_number(value, integral=False)
    elif base is str:
        out = value if isinstance(value, str) else None
    elif typing.get_origin(base) in (list, tuple):
        out = typing.get_origin(base)(value) if isinstance(value, (list, tuple)) else None
        item = (typing.get_args(base) or (Any,))[0]
        if out is not None and item in (str, int, float) and not all(isinstance(x, item) for x in out):
            out = None
    else:
        return value
    if out is None or (literal and out not in literal):
        kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        kind = "one of " + ", ".join(map(repr, literal)) if literal else kinds.get(base, "a list")
        raise XLNetError(f"{where} must be {kind}, not {value!r}")
    return out


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_bool(value)
        except argparse.ArgumentTypeError:
            return None
    return None


def _as_number(value: Any, integral: bool) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        return None
    if not integral:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        return None
    return int(number)


def read_yaml(path: str | Path, allowed: set[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise XLNetError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise XLNetError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise XLNetError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if allowed is not None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise XLNetError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data
