"""The layering rules of the package, checked by reading every import (``ast``; imports inside functions count):

- the objective layer (``mmalign.shared``) imports no model library and no backend;
- the backends ``mmalign.text`` and ``mmalign.image`` never import each other;
- nothing in ``mmalign`` imports the experiments (``mmalign_experiments``), except the documented ``python -m``
  entry points listed in ``ENTRY_SHIMS``;
- there is no import cycle among the modules of ``mmalign``;
- no module imports another module's private (``_``-prefixed) name.

The last tests plant each kind of violation in a throwaway package to show that the checker catches it.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("transformers", "diffusers", "peft", "accelerate")
BACKENDS = ("mmalign.text", "mmalign.image")
EXPERIMENTS = "mmalign_experiments"
# The documented `python -m` commands whose code moved to the experiments; nothing else may import them.
ENTRY_SHIMS = {"mmalign.__main__", "mmalign.image.debias.__main__"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    target: str  # the imported module (a module of the package when one matches, else the dotted name as written)
    name: str  # for ``from X import name``: the name, else ""
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(package_dir: Path) -> tuple[set[str], list[Import]]:
    """Every module of the package rooted at ``package_dir`` and every import statement in it (at any depth)."""
    root = package_dir.parent
    files = sorted(package_dir.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    imports = []
    for path in files:
        importer = module_name(path, root)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imports += [Import(importer, alias.name, "", node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = importer.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    imports.append(Import(importer, sub if sub in modules else base, alias.name, node.lineno))
    return modules, imports


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _shown(imp: Import) -> str:
    return f"{imp.importer} (line {imp.line}) imports {imp.target}" + (f" ({imp.name})" if imp.name else "")


def layering_violations(imports: list[Import], *, shims: set[str] = ENTRY_SHIMS) -> list[str]:
    found = []
    for imp in imports:
        if _within(imp.importer, "mmalign.shared"):
            if any(_within(imp.target, lib) for lib in MODEL_LIBRARIES):
                found.append(f"objective layer imports a model library: {_shown(imp)}")
            if any(_within(imp.target, backend) for backend in BACKENDS):
                found.append(f"objective layer imports a backend: {_shown(imp)}")
        for own, other in (BACKENDS, BACKENDS[::-1]):
            if _within(imp.importer, own) and _within(imp.target, other):
                found.append(f"backend imports the other backend: {_shown(imp)}")
        if _within(imp.importer, "mmalign") and _within(imp.target, EXPERIMENTS) and imp.importer not in shims:
            found.append(f"library imports the experiments: {_shown(imp)}")
    return found


def private_name_violations(modules: set[str], imports: list[Import]) -> list[str]:
    return [f"private name imported across modules: {_shown(imp)}" for imp in imports
            if imp.name.startswith("_") and imp.target in modules and imp.target != imp.importer
            and f"{imp.target}.{imp.name}" not in modules and not imp.name.startswith("__")]


def import_cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components (more than one module, or a module importing itself) of the import graph."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.importer in modules:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative: the graph may be deeper than the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


@pytest.fixture(scope="module")
def library():
    return read_imports(ROOT / "mmalign")


def test_the_checker_reads_the_library(library):
    modules, imports = library
    assert {"mmalign.shared.objectives", "mmalign.text.data.files", "mmalign.image.training"} <= modules
    # imports inside functions count: the text trainer loads accelerate only when it runs
    assert any(i.importer == "mmalign.text.recipes.preference" and i.target.startswith("accelerate") for i in imports)


def test_layers_are_respected(library):
    assert layering_violations(library[1]) == []


def test_no_import_cycle_in_the_library(library):
    assert import_cycles(*library) == []


def test_no_private_name_is_imported_across_modules(library):
    assert private_name_violations(*library) == []


def test_the_entry_shims_are_thin_and_exist():
    for shim in ENTRY_SHIMS:
        path = ROOT.joinpath(*shim.split(".")).with_suffix(".py")
        assert path.is_file(), shim
        assert len(path.read_text().splitlines()) < 15, f"{shim} is an entry point, not a place for code"


def test_the_experiments_only_import_the_library_not_the_reverse():
    modules, imports = read_imports(ROOT / EXPERIMENTS)
    assert any(_within(i.target, "mmalign") for i in imports)
    assert import_cycles(modules, imports) == []


# ---------------------------------------------------------------------------------------- the checker can fail
def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "mmalign"


def test_a_planted_cycle_hidden_in_a_function_is_found(tmp_path):
    package = _plant(tmp_path, {
        "mmalign/__init__.py": "",
        "mmalign/text/__init__.py": "",
        "mmalign/text/bins.py": "def f():\n    from mmalign.text.reward import g\n",
        "mmalign/text/reward.py": "from mmalign.text import config\n",
        "mmalign/text/config.py": "from .bins import f\n",
        "mmalign/text/ok.py": "import mmalign.text.config\n",
    })
    assert import_cycles(*read_imports(package)) == [["mmalign.text.bins", "mmalign.text.config", "mmalign.text.reward"]]


def test_planted_forbidden_imports_are_found(tmp_path):
    package = _plant(tmp_path, {
        "mmalign/__init__.py": "",
        "mmalign/__main__.py": "from mmalign_experiments.rng import main\n",
        "mmalign/shared/__init__.py": "",
        "mmalign/shared/objectives.py": "def f():\n    import transformers\n    from mmalign.text import data\n",
        "mmalign/text/__init__.py": "",
        "mmalign/text/data.py": "from mmalign.image.data import load\nfrom mmalign_experiments import rng\n"
                                "from mmalign.text.other import _private\n",
        "mmalign/text/other.py": "_private = 1\n",
        "mmalign/image/__init__.py": "",
        "mmalign/image/data.py": "",
    })
    modules, imports = read_imports(package)
    found = layering_violations(imports)
    assert any(v.startswith("objective layer imports a model library: mmalign.shared.objectives") for v in found)
    assert any(v.startswith("objective layer imports a backend: mmalign.shared.objectives") for v in found)
    assert any(v.startswith("backend imports the other backend: mmalign.text.data") for v in found)
    assert any(v.startswith("library imports the experiments: mmalign.text.data") for v in found)
    assert not any("mmalign.__main__" in v for v in found)  # a listed entry shim
    assert len(found) == 4
    assert private_name_violations(modules, imports) == [
        "private name imported across modules: mmalign.text.data (line 3) imports mmalign.text.other (_private)"]
