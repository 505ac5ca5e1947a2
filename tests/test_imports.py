"""Imports flow one way: the run-directory format at the bottom, then the model, loss and data
registries, then replay, then analyses; the recorder's training side and the presets stand beside
replay and analyses, never below them. ``cli.py`` sits on top and may import anything.

The test walks every import statement of the library (module level and inside functions) with
``ast`` and fails on any arrow against this direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recorder", "replay", "analyses")

# Layers by module prefix, lowest first: a module may import its own layer and those below it.
FORMAT = ("recorder.rundir",)
REGISTRIES = ("recorder.models", "recorder.losses", "recorder.datasets")
ALLOWED = {
    "format": FORMAT,
    "registries": FORMAT + REGISTRIES,
    "replay": FORMAT + REGISTRIES + ("replay",),
    "analyses": FORMAT + REGISTRIES + ("replay", "analyses"),
    "recorder": ("recorder",),  # the training side: the recorder, its writer, presets, training loops
}


def layer(module: str) -> str:
    if module.startswith(FORMAT):
        return "format"
    if module.startswith(REGISTRIES):
        return "registries"
    return module.split(".")[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from recorder.rundir import run`` imports the submodule recorder.rundir.run
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def violations(path: Path) -> list[str]:
    importer = module_name(path)
    allowed = ALLOWED[layer(importer)]
    bad = []
    for line, imported in project_imports(path):
        if not imported.startswith(allowed):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {importer} imports {imported}")
    return bad


def test_the_library_has_modules_in_every_layer():
    layers = {layer(module_name(p)) for p in sources()}
    assert layers == {"format", "registries", "replay", "analyses", "recorder"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    assert violations(path) == []


def test_the_check_catches_an_arrow_against_the_direction(monkeypatch):
    """The walker is not vacuous: replay importing analyses, or the format importing torch-side
    recorder code, is reported."""
    fake = ROOT / "replay" / "_probe_for_test_imports.py"
    assert not fake.exists()
    text = "from analyses.classpairs import separation_auc\nimport recorder.recorder\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    bad = violations(fake)
    assert any("imports analyses.classpairs" in b for b in bad)
    assert any("imports recorder.recorder" in b for b in bad)
    fake_format = ROOT / "recorder" / "rundir" / "_probe.py"
    text = "from recorder.models import build_model\n"
    assert any("imports recorder.models" in b for b in violations(fake_format))
