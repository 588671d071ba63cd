"""Rules of the source tree itself, read as text (ast): what a review would otherwise
have to catch by eye."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from scangate.api.imagescan import Phase

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "scangate"

NOT_PHASES = {
    ("core/scanstate.py", "project_job"): "a Job's condition types (Complete, Failed)",
    ("scanning/reconciler.py", "_collect"): "a Job's condition type (JobState.finished)",
}
"""Places where a phase's word stands for something else, by file and function."""


def _modules(below: Path) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(below.rglob("*.py")):
        yield path.relative_to(below).as_posix(), ast.parse(path.read_text(), str(path))


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)):
            found.add(id(node.body[0].value))
    return found


def _strings_by_function(tree: ast.Module) -> Iterator[tuple[str, ast.Constant]]:
    """Each string constant with the name of the function it is in ("" at module level)."""
    def visit(node: ast.AST, function: str) -> Iterator[tuple[str, ast.Constant]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, child.name)
            else:
                if isinstance(child, ast.Constant) and isinstance(child.value, str):
                    yield function, child
                yield from visit(child, function)
    yield from visit(tree, "")


def phase_literals(below: Path) -> list[str]:
    """`file:line: "Word"` for each string constant equal to an ImageScan phase outside
    api/ (the enum's home) and outside docstrings and the known other meanings."""
    words = {p.value for p in Phase}
    found = []
    for name, tree in _modules(below):
        if name.startswith("api/"):
            continue
        docstrings = _docstrings(tree)
        for function, constant in _strings_by_function(tree):
            if (constant.value in words and id(constant) not in docstrings
                    and (name, function) not in NOT_PHASES):
                found.append(f"{name}:{constant.lineno}: {constant.value!r}")
    return found


def test_phases_are_named_by_the_enum_outside_api() -> None:
    found = phase_literals(PACKAGE)
    assert not found, ("ImageScan phases written as string literals; use "
                       "scangate.api.imagescan.Phase:\n" + "\n".join(found))


def test_the_phase_literal_check_finds_a_literal(tmp_path: Path) -> None:
    # The check itself can fail: a module that compares with a bare phase word is found.
    (tmp_path / "x.py").write_text('def f(s):\n    """Completed"""\n'
                                   '    return s.phase == "Completed"\n')
    assert phase_literals(tmp_path) == ["x.py:3: 'Completed'"]


def test_phase_values_are_plain_strings() -> None:
    # A StrEnum: what status and JSON hold is the very word.
    import json

    assert all(isinstance(p, str) for p in Phase)
    assert json.dumps({"phase": Phase.COMPLETED}) == '{"phase": "Completed"}'
    assert f"{Phase.PENDING}" == "Pending"


def core_imports(below: Path) -> list[str]:
    """`file:line: module` for each import of scangate.core in the modules below `below`
    (at any depth of the module: a function's own import counts too)."""
    return imports_of(below, ("scangate.core",))


def imports_of(below: Path, packages: tuple[str, ...]) -> list[str]:
    """`file:line: module` for each import of one of `packages` in the modules below
    `below` (at any depth of the module: a function's own import counts too)."""
    found = []
    for name, tree in _modules(below):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = ([f"{node.module}.{alias.name}" for alias in node.names]
                           if node.module == "scangate" else [node.module])
            else:
                continue
            found += [f"{name}:{node.lineno}: {m}" for m in modules
                      if any(m == p or m.startswith(f"{p}.") for p in packages)]
    return found


def test_api_imports_nothing_of_core() -> None:
    # One way only: core/ uses the API models (plain pydantic types); api/ generates the
    # CRDs and must not depend on the logic that reads them.
    found = core_imports(PACKAGE / "api")
    assert not found, "api/ imports core/:\n" + "\n".join(found)


def test_the_import_check_finds_an_import_of_core(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("import scangate.core.trivy\n"
                                   "from scangate import core\n"
                                   "def f():\n"
                                   "    from scangate.core.durations import parse_duration\n"
                                   "from scangate.api.common import Model\n")
    assert core_imports(tmp_path) == ["x.py:1: scangate.core.trivy", "x.py:2: scangate.core",
                                      "x.py:4: scangate.core.durations"]


COMPONENTS = ("scanning", "notify", "admission", "handlers", "inventory")
"""The scan reconciler and rule controller, the notifier, the gate, kopf's handlers, the
inventory of what runs: each
reads the shared cache (scangate.cache) and core/, never another's modules."""


def test_no_component_imports_another() -> None:
    found = [f"{component}/{line}" for component in COMPONENTS
             for line in imports_of(PACKAGE / component, tuple(
                 f"scangate.{other}" for other in COMPONENTS if other != component))]
    assert not found, "a component imports another:\n" + "\n".join(found)


def test_the_component_check_finds_an_import_of_another(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("from scangate.notify.notifier import Notifier\n"
                                   "from scangate.cache import Cache\n")
    assert imports_of(tmp_path, ("scangate.notify",)) == [
        "x.py:1: scangate.notify.notifier"]
