"""Fixtures shared by the test modules (plain helpers are in ``tests/helpers.py``).

Markers (registered in ``pyproject.toml``): ``slow`` for the heavy tests (ResNet-18 runs,
torchrun, kill trials), so that ``pytest -m "not slow"`` is the quick loop; ``cuda`` for tests
that need a GPU, skipped where torch sees none.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from recorder.training import torch_threads


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for the module: tiny models gain nothing from more, forked
    replays need it, and a single-process reference then matches one-thread torchrun ranks."""
    with torch_threads(1):
        yield


@pytest.fixture
def runner() -> CliRunner:
    """A click test runner for ``cli.main``."""
    return CliRunner()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``cuda`` tests where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
