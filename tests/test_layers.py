"""The layering of DESIGN.md holds: a module imports (also lazily) only from its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = ("data", "world", "models", "losses", "rollout", "eval", "recipes", "cli")
"""Bottom to top; `mmalign.errors`, `mmalign.atomic` and `mmalign.config` sit below every layer."""
SHARED = {"errors", "atomic", "config"}
SRC = Path(__file__).resolve().parents[1] / "src" / "mmalign"


def imported_mmalign_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmalign."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mmalign."))
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_from_itself_or_below(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1]) | SHARED
    violations = {
        f"{path.relative_to(SRC)} imports mmalign.{pkg}"
        for path in sorted((SRC / layer).rglob("*.py"))
        for pkg in imported_mmalign_packages(path) - allowed
    }
    assert not violations, sorted(violations)


def test_shared_modules_import_no_layer() -> None:
    for name in SHARED:
        assert imported_mmalign_packages(SRC / f"{name}.py") <= SHARED, name
