"""Settings declared once and read strictly.

    rho: float = setting(0.05, "SAM radius (>= 0).", option="rho")    # help, CLI option, YAML key: one source

A field's metadata holds its help text, its choices (a Choice enum), its option name and help panel;
fastflat.config assembles the fields of every method into TrainConfig and the CLI generates its options
from them. Reading is strict: a YAML file with a key given twice is an error (PyYAML keeps the last one
silently); a missing, unreadable, binary or malformed file is one UserError line naming it; values are
coerced into the dataclasses with every problem collected.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fastflat.errors import UserError


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not a text file; pass a YAML file") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


class Choice(str, enum.Enum):
    """A closed set of string values: YAML holds the plain string, the CLI shows [a|b|c]."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(c.value for c in cls)


def setting(default: Any, help: str, *, option: str | None = None, choices: type[Choice] | None = None,
            panel: str | None = None) -> Any:
    """A config field with its help text (shown by --help), and optionally its closed set of values,
    its CLI option name (default: the dotted key with _ for .) and its help panel (default: its section's)."""
    metadata: dict[str, Any] = {"help": help}
    for key, value in (("option", option), ("choices", choices), ("panel", panel)):
        if value is not None:
            metadata[key] = value
    return dataclasses.field(default=default, metadata=metadata)


def enum_of(name: str, *values: str) -> type[Choice]:
    """A Choice enum whose members are the given strings."""
    return Choice(name, {value: value for value in values})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ValueError saying what was expected."""
    if isinstance(value, Choice):
        value = value.value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) < len(typing.get_args(hint)) and (
                value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for option in options[:-1]:  # int | str: a count if it reads as one, else the word (checked later)
            try:
                return _coerce(key, value, option)
            except ValueError:
                pass
        hint = options[-1]
    if typing.get_origin(hint) is tuple:  # "0.9,0.999" (CLI), [0.9, 0.999] (YAML), a tuple (Python)
        parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
        kinds = typing.get_args(hint)
        if not isinstance(parts, (list, tuple)) or len(parts) != len(kinds):
            raise ValueError(f"{key} = {value!r} is invalid: expected {len(kinds)} comma-separated values")
        return tuple(_coerce(key, part, kind) for part, kind in zip(parts, kinds))
    if hint is str:
        return value if isinstance(value, bool) else str(value)  # a YAML boolean: _check explains
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{key} = {value!r} is invalid: expected true or false")
        return value
    if isinstance(value, bool) or (hint is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} = {value!r} is invalid: expected {hint.__name__}")
    try:
        return hint(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} = {value!r} is invalid: expected {hint.__name__}") from None


def build(cls: type, values: dict[str, Any], problems: list[str], prefix: str = "") -> Any:
    """cls(**values) with each value coerced; a bad or unknown value is noted in `problems` and
    the field keeps its default, so the rest can still be checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(values) - names):
        problems.append(f"unknown config key {prefix + unknown!r}{did_you_mean(unknown, _keys_below(cls, prefix))}; "
                        f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, dict):
                kwargs[name] = build(hint, value, problems, prefix=f"{prefix}{name}.")
            else:
                problems.append(f"{prefix + name} must be a mapping of its settings, got {value!r}")
            continue
        try:
            kwargs[name] = _coerce(prefix + name, value, hint)
        except ValueError as e:
            problems.append(str(e))
    return cls(**kwargs)


def _keys_below(cls: type, prefix: str) -> dict[str, str]:
    """What a key given at this level could have meant: each field by name, and each field of a section
    by its own name too ('rho' -> 'sam.rho'), mapped to the dotted key to write."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for sub in dataclasses.fields(hints[f.name]):
                keys.setdefault(sub.name, f"{prefix}{f.name}.{sub.name}")
                keys[f"{f.name}.{sub.name}"] = f"{prefix}{f.name}.{sub.name}"
    keys.update({f.name: prefix + f.name for f in dataclasses.fields(cls)})
    return keys


def did_you_mean(given: str, candidates: dict[str, str] | list[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or ''. A dict maps what is compared to what is shown."""
    import difflib

    shown = candidates if isinstance(candidates, dict) else {c: c for c in candidates}
    anagrams = [c for c in shown if sorted(c) == sorted(str(given))]  # a swap of two letters: sma -> sam
    close = anagrams or difflib.get_close_matches(str(given), list(shown), n=1, cutoff=0.6)
    return f" (did you mean {shown[close[0]]}?)" if close else ""


def raise_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} config errors: " + "; ".join(problems))


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"sam.rho": 0.1} -> {"sam": {"rho": 0.1}}; None values mean 'not given' and are dropped."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.replace("-", "_").split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
