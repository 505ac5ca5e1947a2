"""``cli.py --help`` starts fast: the heavy libraries are imported by the commands that use them,
not at start-up nor for the help of the commands below."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "matplotlib", "scipy", "zarr", "xarray")
# ``replay`` and ``bench`` list the update rules: their declarations (replay/rules.py) import no torch.
LIGHT_COMMANDS = [[], ["presets"], ["record"], ["replay"], ["bench"], ["analyze"], ["demo"], ["theory"]]


@pytest.mark.parametrize("command", LIGHT_COMMANDS, ids=lambda c: " ".join(c) or "cli")
def test_help_imports_no_heavy_library(command):
    code = (
        "import sys\nfrom cli import main\n"
        f"try:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "Usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
