"""The preset registry: named, configurable training runs that record themselves.

A preset's configuration is a dataclass whose fields carry ``metadata={"help": ...}``, so a
command line can list them and set them with ``field=value`` (:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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


def check_settings(config: Any) -> None:
    """Raise ValueError, naming the setting and what it takes, for a setting of the dataclass
    ``config`` out of its range (before anything is recorded):

    - a setting with ``metadata["choices"]`` must be one of them;
    - an integer setting (or each integer of a list) counts something, so it is at least 1, except
      seeds (names ending in ``seed``) and the names in :data:`_AT_LEAST`;
    - a float setting is finite, and within :data:`_FLOAT_RANGES` for the names there;
    - ``device`` is ``auto`` where that is its default, else a torch device this machine has.
    """
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), f.name
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{name}={value!r}: must be one of {', '.join(map(str, choices))}")
        numbers = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
            low = 0 if name.endswith("seed") else _AT_LEAST.get(name, 1)
            if any(v < low for v in numbers):
                what = "each must be" if isinstance(value, list) else "must be"
                raise ValueError(f"{name}={value!r}: {what} at least {low}")
        elif isinstance(value, float):
            in_range, allowed = _FLOAT_RANGES.get(name, (lambda x: True, "a finite number"))
            if not (math.isfinite(value) and in_range(value)):
                raise ValueError(f"{name}={value!r}: must be {allowed}")
        if name == "device":
            problem = _device_problem(value, allow_auto=f.default == "auto")
            if problem:
                raise ValueError(f"device={value!r}: {problem}")


_AT_LEAST = {"workers": 0, "classes": 0, "background": 0}  # integer settings that may be 0 (seeds too)
_FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {  # name -> test, the range in words
    "lr": (lambda x: x > 0, "a finite number above 0"),
    "weight_decay": (lambda x: x >= 0, "a finite number of at least 0"),
    "momentum": (lambda x: x >= 0, "a finite number of at least 0"),
    "test_fraction": (lambda x: 0 < x < 1, "a number between 0 and 1"),
}


def _device_problem(device: str, allow_auto: bool) -> str | None:
    """What keeps torch from training on ``device`` on this machine, or None."""
    if device == "auto" and allow_auto:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a torch device (cpu, cuda, cuda:1, ...)" + (" or auto" if allow_auto else "")
    backend = getattr(torch, parsed.type, None) if parsed.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available"):
        count = backend.device_count() if backend.is_available() else 0
        if count == 0:
            return f"torch sees no {parsed.type} device on this machine; use device=cpu"
        if parsed.index is not None and parsed.index >= count:
            return f"this machine has {count} {parsed.type} device(s), numbered from 0"
    return None


# The built-in presets register themselves on import.
from recorder.presets import digits as _digits  # noqa: E402,F401
from recorder.presets import digits_pairs as _digits_pairs  # noqa: E402,F401
from recorder.presets import regression as _regression  # noqa: E402,F401
from recorder.presets import theory as _theory  # noqa: E402,F401
from recorder.presets import vision as _vision  # noqa: E402,F401
