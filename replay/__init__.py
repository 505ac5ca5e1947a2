"""Replay a recorded run offline: per-sample virtual updates and S_rel measures with torch.func.

>>> from replay import ReplayConfig, UpdateConfig, replay      # doctest: +SKIP
>>> replay("runs/digits", ReplayConfig(UpdateConfig("recorded")))   # -> runs/digits/recorded.zarr

The configuration imports no torch; :func:`replay` (:mod:`replay.run`, which does) is loaded on
first use, so the command line's help stays fast.
"""

from typing import TYPE_CHECKING, Any

from recorder.rundir.errors import ReplayError, ReplayWarning
from replay.config import ReplayConfig, UpdateConfig

if TYPE_CHECKING:
    from replay.run import replay

__all__ = ["ReplayConfig", "ReplayError", "ReplayWarning", "UpdateConfig", "replay"]


def __getattr__(name: str) -> Any:
    if name == "replay":
        from replay.run import replay

        return replay
    raise AttributeError(f"module 'replay' has no attribute {name!r}")
