"""The package layers import downward only:
bench -> train.py/eval.py -> training -> evaluation -> dataset_builder -> modeling_icl_ser.

modeling_icl_ser/ is what a Hub checkpoint carries, so it must not reach up into the data,
evaluation or script layers; dataset_builder/ must not reach into evaluation/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> top-level modules it must never import (at any depth: module level or in a function).
FORBIDDEN = {
    "modeling_icl_ser": {"dataset_builder", "evaluation", "training", "train", "eval", "bench"},
    "dataset_builder": {"evaluation", "training", "train", "eval", "bench"},
    "evaluation": {"training", "train", "eval", "bench"},
    "training": {"train", "eval", "bench"},
}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute module ``source`` imports (relative imports stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_sees_every_kind_of_import():
    source = "import a.b\nfrom c.d import e\nfrom . import f\ndef g():\n    from h import i\n"
    assert imported_modules(source) == {"a", "c", "h"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_upward(package):
    assert (REPO / package / "__init__.py").is_file()
    upward = {
        str(path.relative_to(REPO)): sorted(imported_modules(path.read_text(encoding="utf-8")) & FORBIDDEN[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_model_folder_holds_no_evaluation_code():
    """baselines, metrics and the episodic glue live in evaluation/ (no shims left behind)."""
    for name in ("baselines.py", "metrics.py", "episodic.py"):
        assert not (REPO / "modeling_icl_ser" / name).exists()
        assert (REPO / "evaluation" / name).is_file()


#: Longest file the model folder may hold: small modules with one job each.
MAX_MODEL_FILE_LINES = 650


def test_model_folder_files_are_small():
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines())
               for path in sorted((REPO / "modeling_icl_ser").glob("*.py"))}
    assert {name: n for name, n in lengths.items() if n > MAX_MODEL_FILE_LINES} == {}


def test_model_folder_modules_import_only_lower_ones():
    """Inside modeling_icl_ser/, relative imports form no cycle (each file imports only files below it)."""
    folder = REPO / "modeling_icl_ser"
    imports = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                              if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done or module not in imports:
            return
        visiting.append(module)
        for name in sorted(imports[module]):
            visit(name)
        visiting.pop()
        done.add(module)

    for module in sorted(imports):
        visit(module)
