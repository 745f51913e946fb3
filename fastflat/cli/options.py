"""CLI options generated from the config's fields: the help text, default, choices and panel of each
`fastflat train` option are those its field declares (fastflat.settings.setting), so they cannot drift.

    params = config_options()                  # one keyword-only inspect.Parameter per setting
    command = with_signature(run, params)       # run(**options) called by Typer with those options
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

from fastflat.cli.app import opt
from fastflat.config import GeneralConfig, config_fields, option_keys
from fastflat.methods import registry

FIRST_PANELS = ("Method", "SAM", "Optimisation", "Data and model", "Run")  # then the other methods' panels


def _option_type(hint: Any, choices: Any) -> Any:
    """The type Typer parses: the Choice enum for a closed set; otherwise the field's type without None
    (int | str, as sse.keep, is read as text and coerced by the config)."""
    if choices is not None:
        return choices
    if typing.get_origin(hint) is tuple:
        return str  # "0.9,0.999": the config splits and checks it
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return hint


def _section_panels() -> dict[str, str]:
    return {cls.settings_key(): cls.panel for cls in registry().values() if cls.config is not None}


def config_options() -> list[inspect.Parameter]:
    """Every setting of TrainConfig as an optional keyword parameter (None = not given), grouped by panel."""
    panels, names = _section_panels(), {key: name for name, key in option_keys().items()}
    params: list[tuple[int, int, inspect.Parameter]] = []
    for index, (key, f, hint) in enumerate(config_fields()):
        section = key.split(".")[0] if "." in key else None
        panel = f.metadata.get("panel") or panels.get(section, GeneralConfig.__name__)
        default = f.default if f.default is not None and not callable(f.default) else None
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kind = _option_type(hint, f.metadata.get("choices"))
        annotation = Annotated[kind | None, opt(f.metadata.get("help", ""), panel, default)]
        rank = FIRST_PANELS.index(panel) if panel in FIRST_PANELS else len(FIRST_PANELS)
        params.append((rank, index, inspect.Parameter(names[key], inspect.Parameter.KEYWORD_ONLY, default=None,
                                                      annotation=annotation)))
    return [p for _, _, p in sorted(params, key=lambda item: item[:2])]


def with_signature(function: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """`function` (taking **options) presented to Typer with `params` as its signature."""
    function.__signature__ = inspect.Signature(params)
    function.__annotations__ = {p.name: p.annotation for p in params}
    return function


def setting_help(key: str) -> str:
    """The help text of the config setting `key` with its default: for commands that pass a setting on
    to a run (fastflat curve's --lr), so their help is the config's too."""
    field = next(f for k, f, _ in config_fields() if k == key)
    return f"{field.metadata.get('help', '')} \\[default: {field.default}]"  # \\[: not Rich markup
