"""The preset registry: named, configurable training runs that record themselves.

A preset's configuration is a dataclass whose fields carry ``metadata={"help": ...}``, so a
command line can list them and set them with ``field=value`` (:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Preset:
    """``record(run_dir, config)`` trains with the recorder attached and writes ``run_dir``."""

    name: str
    help: str
    config_cls: type
    record: Callable[[Path, Any], None]


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def apply_overrides(config: Any, assignments: Iterable[str]) -> Any:
    """A copy of the dataclass ``config`` with ``field=value`` assignments applied.

    Values are parsed as JSON (``epochs=3``, ``hidden=[256,128]``, ``progress=false``) and checked
    against the field's type; a ``str`` field takes the text as it is.
    """
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise ValueError(f"expected field=value with field one of {', '.join(names)}; got {assignment!r}")
        changes[name] = _parse(name, raw, hints[name])
    return dataclasses.replace(config, **changes)


def _parse(name: str, raw: str, hint: Any) -> Any:
    """``raw`` as a value of type ``hint`` (JSON syntax unless the field is a string)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if str in options:
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(
            f"{name}={raw!r}: not a valid value (use JSON syntax: 3, 0.1, true, [128])"
        ) from None
    for option in options:
        kind = typing.get_origin(option) or option
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (
            isinstance(kind, type)
            and isinstance(value, kind)
            and not (kind is int and isinstance(value, bool))
        ):
            return value
    raise ValueError(f"{name}={raw!r}: expected {hint}")


# The built-in presets register themselves on import.
from recorder.presets import digits as _digits  # noqa: E402,F401
from recorder.presets import regression as _regression  # noqa: E402,F401
from recorder.presets import theory as _theory  # noqa: E402,F401
from recorder.presets import vision as _vision  # noqa: E402,F401
