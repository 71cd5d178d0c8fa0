"""Imports run down the layers only: schemas <- data <- annotate / train (annotate and train apart).

Every import counts, the lazy ones inside functions too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("schemas", "data", "annotate", "train", "bench")
ALLOWED = {
    "schemas": {"schemas"},
    "data": {"schemas", "data"},
    "annotate": {"schemas", "data", "annotate"},
    "train": {"schemas", "data", "train"},
}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OURS}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_reaches_up_or_across(layer):
    wrong = [f"{path.relative_to(REPO)}:{line} imports {package}"
             for path in sorted((REPO / layer).rglob("*.py"))
             for package, line in sorted(_imported_packages(path)) if package not in ALLOWED[layer]]
    assert not wrong, "\n".join(wrong)
