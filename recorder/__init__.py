"""Record a training trajectory into a run directory: the recorder, its schedules and the format.

The names below are imported on first use, so that the recorder's writer process
(``python -m recorder.writer``) starts without importing torch.
"""

__all__ = ["ModelSpec", "Recorder", "RunDir", "RunDirError", "RunSpec", "Schedule"]


def __getattr__(name: str):
    if name == "Recorder":
        from recorder.recorder import Recorder

        return Recorder
    if name == "Schedule":
        from recorder.schedule import Schedule

        return Schedule
    if name in ("ModelSpec", "RunSpec"):
        from recorder.rundir import spec

        return getattr(spec, name)
    if name == "RunDir":
        from recorder.rundir.run import RunDir

        return RunDir
    if name == "RunDirError":
        from recorder.rundir.errors import RunDirError

        return RunDirError
    raise AttributeError(f"module 'recorder' has no attribute {name!r}")
