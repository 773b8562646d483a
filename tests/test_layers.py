"""The layout the code promises (docs/ARCHITECTURE.md): stages as subpackages in layers, each
importing only from layers below it or from itself; no import cycles; the metrics module free of
torch; the size limits. Read from the sources' syntax trees, imports inside functions and under
TYPE_CHECKING included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "bnrt"
# lowest first; a unit may import its own modules and any unit of a lower layer, nothing else
LAYERS = [
    ["bnrt.errors", "bnrt.version", "bnrt.progress"],
    ["bnrt.session"],
    ["bnrt.folding"],
    ["bnrt.io"],
    ["bnrt.verify", "bnrt.train", "bnrt.deploy"],
    ["bnrt.pipeline"],
    ["bnrt.cli"],
    ["bnrt", "bnrt.__main__"],
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The bnrt modules ``path`` imports (``from x import name`` counts ``x.name`` when that is a
    module)."""
    known = modules()
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & set(known)
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return {m for m in found if m in known and m != here}


def unit(module: str) -> str:
    """The layer unit a module belongs to: the most specific name listed in LAYERS."""
    listed = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    return max(listed, key=len)


def layer(name: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if name in units)


def upward_imports() -> list[str]:
    problems = []
    for name, path in modules().items():
        for target in sorted(imports(path)):
            mine, theirs = unit(name), unit(target)
            if mine != theirs and layer(theirs) >= layer(mine):
                problems.append(f"{name} imports {target} ({theirs} is not below {mine})")
    return problems


def cycles() -> list[list[str]]:
    graph = {name: sorted(imports(path)) for name, path in modules().items()}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_belongs_to_a_layer():
    assert [m for m in modules() if not any(m == u or m.startswith(u + ".") for layer in LAYERS for u in layer)] == []


def test_layers_import_downward_only():
    assert upward_imports() == []


def test_no_import_cycles():
    assert cycles() == []


def test_the_layer_checks_catch_what_they_promise(tmp_path, monkeypatch):
    """A module of a low layer importing a high one, and two modules importing each other, are found."""
    fake = tmp_path / "bnrt"
    for rel, text in {"__init__.py": "", "errors.py": "from bnrt.cli import main\n",
                      "cli/__init__.py": "from bnrt import errors\n", "io/__init__.py": "",
                      "io/a.py": "from bnrt.io import b\n", "io/b.py": "from . import a\n"}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_imports() == ["bnrt.errors imports bnrt.cli (bnrt.cli is not below bnrt.errors)"]
    assert sorted(map(tuple, cycles())) == [("bnrt.cli", "bnrt.errors", "bnrt.cli"), ("bnrt.io.a", "bnrt.io.b", "bnrt.io.a")]


def _reached(start: str) -> set[str]:
    """Every bnrt module ``start`` imports, directly or through other bnrt modules."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports(modules()[name]))
    return seen


def _third_party(name: str) -> set[str]:
    tree = ast.parse(modules()[name].read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return tops


def test_the_metrics_never_import_torch():
    reached = _reached("bnrt.verify.metrics")
    assert "bnrt.verify.metrics" in reached
    assert sorted(m for m in reached if {"torch", "onnx", "onnxruntime"} & _third_party(m)) == []


def test_no_module_over_400_lines_and_no_function_over_60():
    long_modules = {name: n for name, path in modules().items()
                    if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1 - len(node.decorator_list)
                if size > MAX_FUNCTION_LINES:
                    long_functions[f"{name}.{node.name}"] = size
    assert (long_modules, long_functions) == ({}, {})


def test_only_the_session_layer_makes_an_inference_session():
    makers = sorted(name for name, path in modules().items() if "InferenceSession(" in path.read_text())
    assert makers == ["bnrt.session"]


def test_no_stage_tests_a_model_file_suffix():
    """A model's kind is ``ModelSource.kind`` (by content); output names may end in .onnx."""
    hits = sorted(name for name, path in modules().items()
                  if '.suffix.lower() == ".onnx"' in path.read_text() or 'endswith(".onnx")' in path.read_text()
                  or "endswith('.onnx')" in path.read_text())
    assert hits == ["bnrt.io.source"]
