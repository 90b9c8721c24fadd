"""Layers point one way: merge/ is pure (no Ray), cluster/ runs work and knows nothing of sweeps,
evaluation, serving or load tests; sweep/, serve/ and loadtest/ sit on top. Checked on the import
statements of every module, wherever in a module they are (imports inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mergeserve"

# package -> prefixes its modules must not import
FORBIDDEN = {
    "merge": ("ray", "mergeserve.cluster", "mergeserve.sweep", "mergeserve.eval", "mergeserve.serve", "mergeserve.loadtest"),
    "cluster": ("mergeserve.sweep", "mergeserve.eval", "mergeserve.serve", "mergeserve.loadtest"),
    "eval": ("mergeserve.cluster", "mergeserve.sweep", "mergeserve.serve", "mergeserve.loadtest"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    files = sorted((PKG / package).rglob("*.py"))
    assert files
    bad = [
        f"{f.relative_to(PKG.parent)} imports {name}"
        for f in files
        for name in _imports(f)
        if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)
