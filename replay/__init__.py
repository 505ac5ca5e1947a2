"""Replay a recorded run offline: per-sample virtual updates and S_rel measures with torch.func.

>>> from replay import ReplayConfig, UpdateConfig, replay      # doctest: +SKIP
>>> replay("runs/digits", ReplayConfig(UpdateConfig("recorded")))   # -> runs/digits/recorded.zarr
"""

from recorder.rundir.errors import ReplayError, ReplayWarning
from replay.config import ReplayConfig, UpdateConfig
from replay.run import replay

__all__ = ["ReplayConfig", "ReplayError", "ReplayWarning", "UpdateConfig", "replay"]
