"""Every error and warning of the project, in one place.

:class:`ElasticityError` is the base of every error a user can cause: a bad run directory, a
corrupt snapshot, missing data, an unreadable result, a replay that cannot proceed. The command
line catches it and prints its message on one line (exit status 1); a library user can catch it
the same way. The other classes here are internal signals, never shown to a user as they are.

This module imports nothing, so that every layer of the project (the run-directory format at
the bottom, the recorder's stdlib-only writer process included) can raise these.
"""

from __future__ import annotations


class ElasticityError(Exception):
    """Base of every error a user can cause; its message says what and where, in one line."""


class RunDirError(ElasticityError):
    """A run directory (or one of its files) is missing, unreadable or malformed."""


class CorruptSnapshotError(RunDirError):
    """A listed snapshot file is missing, unreadable, truncated or corrupted (its checksum, its
    safetensors encoding or its step disagree with the manifest)."""


class DataError(ElasticityError):
    """A preset's data set is missing or unreadable, or does not fit its settings."""


class ResultsError(ElasticityError):
    """No replay store in a run directory, or a store that is unreadable or malformed."""


class ReplayError(ElasticityError):
    """A replay cannot proceed: bad configuration, unsupported run, or unresolvable precision."""


class ReplayWarning(UserWarning):
    """A replay went on but something in it is suspect (non-finite weights, imprecise measures)."""


class UnfinishedRunWarning(UserWarning):
    """A run directory's recording did not finish (it was interrupted, or is still being
    written): replay and analyses use the snapshots it lists."""


class WriterError(RuntimeError):
    """The recorder's writer process failed, or is gone."""


class UnsupportedModel(Exception):
    """Internal: ``torch.fx`` cannot trace the model, so its output changes cannot be propagated
    layer by layer (the engine then uses a plain difference)."""
