"""The import rule of docs/design.md §4: a module imports only from its own stage or earlier."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "msif"
# Earlier layers first; a module may import its own layer and every layer before it.
LAYERS = [
    {"errors", "version", "storage"},
    {"core"},
    {"data"},
    {"ekfac"},
    {"attribution"},
    {"index"},
    {"evaluation"},
    {"config"},
    {"nodes"},
    {"workflow", "cli", "main_job", "components", "pipelines"},
]
BESIDE = {"world", "testing", "__init__"}  # use the library; the library never imports them


def layer_of(part: str) -> int | None:
    """Index of the layer a top-level name of msif belongs to."""
    return next((i for i, names in enumerate(LAYERS) if part in names), None)


def msif_imports(path: Path) -> set[str]:
    """The first component after `msif.` of every msif import in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("msif"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("msif.")}
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] != "world")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_flow(path):
    top = path.relative_to(SRC).parts[0].removesuffix(".py")
    if top in BESIDE:
        return
    own = layer_of(top)
    assert own is not None, f"{top} is in no layer of docs/design.md"
    later = sorted(m for m in msif_imports(path) if (layer_of(m) or 0) > own)
    assert not later, f"{path.relative_to(SRC)} imports later stage(s) {later}"


def test_a_later_import_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from msif.nodes import runtime\nimport msif.attribution.topk\n")
    assert msif_imports(bad) == {"nodes", "attribution"}
