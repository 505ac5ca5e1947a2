"""Record a training trajectory into a run directory: the recorder, its schedules and the format."""

from recorder.recorder import Recorder
from recorder.runfiles import ModelSpec, RunDir, RunDirError, RunSpec
from recorder.schedule import Schedule

__all__ = ["ModelSpec", "Recorder", "RunDir", "RunDirError", "RunSpec", "Schedule"]
