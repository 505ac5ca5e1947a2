"""The run-directory format: the one place that writes and reads it.

Everything else of the project stands on this subpackage, and it imports nothing else of the
project (``tests/test_imports.py`` enforces it):

- :mod:`~recorder.rundir.errors`: every error class of the project;
- :mod:`~recorder.rundir.files`: crash-safe writes, checksums and JSON (standard library only);
- :mod:`~recorder.rundir.trajectory`: snapshot files, the manifest and metrics rows as they grow
  (standard library only: the recorder's writer process uses it);
- :mod:`~recorder.rundir.spec`: ``spec.json``;
- :mod:`~recorder.rundir.snapshot`: one snapshot file and its manifest entry;
- :mod:`~recorder.rundir.run`: the run directory as a whole (:class:`RunDir` to read it,
  :class:`RunWriter` to write one);
- :mod:`~recorder.rundir.group`: run groups (several seeds of one preset);
- :mod:`~recorder.rundir.overwrite`: recording into a directory that holds a recording.

The layout is documented in the README ("Run directory"). This ``__init__`` imports nothing, so that the
writer process can import the torch-free modules without torch.
"""
