"""The package's folders are floors (docs/architecture.md): a module imports only from its own
folder and the floors below it, so no two folders depend on each other. And only the modules the
map names import deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dist_lm"
# Lowest first; folders on one floor import neither each other nor anything above.
FLOORS = [
    {"files", "config"},
    {"model"},
    {"data"},
    {"runtime"},
    {"store"},
    {"observe", "plan"},
    {"train"},
    {"use"},
    {"commands"},
    {"cli", "__init__"},
    {"__main__"},
]
DEEPSPEED_IMPORTERS = {
    "runtime/engine.py",
    "runtime/parallel.py",
    "train/restore.py",
    "train/to_universal.py",
    "model/moe.py",
}


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports (at any depth: a function's lazy import counts too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def floor_of(folder: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if folder in floor)


def test_every_folder_has_a_floor():
    folders = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert folders == set().union(*FLOORS), folders ^ set().union(*FLOORS)


def test_no_import_runs_up_a_floor_or_across_one():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in imports(path):
            parts = module.split(".")
            if parts[0] != "dist_lm" or len(parts) < 2 or parts[1] == here:
                continue
            if floor_of(parts[1]) >= floor_of(here):
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_only_the_modules_the_map_names_import_deepspeed():
    importers = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(m.split(".")[0] == "deepspeed" for m in imports(p))
    }
    assert importers == DEEPSPEED_IMPORTERS, importers ^ DEEPSPEED_IMPORTERS
