"""The package's layout rules (issue #17): no import circles, `modeling/` self-contained, small library modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "elitekv_peft"
# the demo harness (corpora, the SmolLM2 loader, the commands): a client of the library, kept to its own rules
HARNESS = {"cli", "evaluation", "user_data", "user_model"}
DEMO = PACKAGE.parent / "elitekv_demo"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def test_no_import_circles():
    known = modules()
    graph = {name: imports(path, known) for name, path in known.items()}
    # a package's __init__ importing its own children is how packages work; a child importing its package back is
    # what would close a circle, so those edges stay
    for name in graph:
        graph[name] = (
            {t for t in graph[name] if not (name in known and t.startswith(name + "."))}
            if known[name].name == "__init__.py"
            else graph[name]
        )
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_modeling_imports_nothing_outside_itself():
    """Saved models carry these files (``auto_map``): they must run without the rest of the package."""
    known = modules()
    for name, path in known.items():
        if name.startswith("elitekv_peft.modeling"):
            outside = {t for t in imports(path, known) if not t.startswith("elitekv_peft.modeling")}
            assert not outside, f"{name} imports {sorted(outside)}"
            text = path.read_text(encoding="utf-8")
            assert "import elitekv_peft" not in text and "importlib" not in text, name


def test_library_modules_stay_small():
    for name, path in modules().items():
        if name.rsplit(".", 1)[-1] in HARNESS:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"{name}: {lines} lines (at most {MAX_LINES}: split it by idea)"


def test_no_module_shadows_the_standard_library():
    import sys

    for path in PACKAGE.rglob("*.py"):
        assert path.stem not in sys.stdlib_module_names or path.stem == "__init__", path


def test_the_library_never_imports_the_demo():
    """The demo harness (`elitekv_demo`: Debian corpora, the SmolLM2 loader, ``elitekv run``) is a client of the
    library: no module of ``elitekv_peft`` imports it, at module level or inside a function."""
    assert (DEMO / "__init__.py").is_file()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "elitekv_demo", f"{path.relative_to(PACKAGE.parent)} imports {name}"
        assert 'import_module("elitekv_demo' not in path.read_text(encoding="utf-8"), path
