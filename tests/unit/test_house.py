"""The shape of the house, checked: stages talk through files, functions fit on a screen, lines fit a window."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "mavsr_cli"
MAX_FUNCTION_LINES = 60
MAX_LINE = 120


def _modules():
    return sorted(PKG.rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Dotted names (inside mavsr_cli) that a module imports, relative imports resolved."""
    package = ["mavsr_cli", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_walk_sees_imports():
    # the checks below can fail: the walk finds the stage imports that cli.py does make
    assert "mavsr_cli.stages.decode" in _imported_modules(PKG / "cli.py")


@pytest.mark.parametrize("path", sorted((PKG / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_do_not_import_each_other(path):
    others = {f"mavsr_cli.stages.{p.stem}" for p in (PKG / "stages").glob("*.py") if p != path} - {
        "mavsr_cli.stages.__init__"}
    assert not _imported_modules(path) & others, "shared logic belongs in a library module, not in a stage"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_line_is_longer_than_the_limit():
    long = [f"{path.relative_to(PKG.parent)}:{i} ({len(line)} chars)" for path in _modules()
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, long


def test_the_readmes_code_map_names_every_module():
    """README's table of modules (the newcomer's map) names each module of the package: a top-level
    one in its own row, one in a sub-package in its package's row."""
    readme = (PKG.parent / "README.md").read_text()
    table = readme[readme.index("| module | what it holds |"):]
    rows = {line.split("|")[1].strip(): line for line in table[: table.index("\n\n")].splitlines()[2:]}
    missing = []
    for path in _modules():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(PKG)
        if len(rel.parts) == 1:
            found = any(f"`{path.name}`" in key for key in rows)
        else:
            row = rows.get(f"`{rel.parts[0]}/`", "")
            found = f"`{path.name}`" in row or f"`{path.stem}`" in row  # stages/ names its commands
        if not found:
            missing.append(str(rel))
    assert not missing, missing
