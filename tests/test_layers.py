"""The package's layers (issue 16): the container's modules import downwards only, no module
imports itself round a cycle, and ``import kernelpack`` stays light.

    layout  <-  codecs  <-  writer, reader        files: standalone (kernelpack.errors only)

layout.py is what the bytes are, codecs.py the payload codecs, files.py file names and atomic
writes; the writer and the reader each build on them and never on each other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kernelpack

ROOT = Path(kernelpack.__file__).parent

#: What each module of the container may not import, at import time or inside a function.
FORBIDDEN = {
    "layout": {"codecs", "files", "reader", "writer"},
    "codecs": {"files", "reader", "writer"},
    "files": {"layout", "codecs", "reader", "writer"},
    "writer": {"reader"},
    "reader": {"writer"},
}

#: Libraries ``import kernelpack`` does not load (they load on use).
HEAVY = ("torch", "onnx", "onnxruntime", "zstandard", "scipy", "numba", "safetensors", "threadpoolctl")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported(path: Path, lazy: bool) -> set[str]:
    """The kernelpack modules a module's source imports: at module level, or (``lazy``)
    anywhere, function bodies included."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            names = {f"{node.module}.{a.name}" for a in node.names}
            submodules = names & MODULES.keys()
            found.update(submodules)
            if names - submodules:  # names defined in the module itself
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        for child in ast.iter_child_nodes(node):
            if lazy or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found - {module_name(path)}


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_each_container_module_imports_only_the_layers_below_it(name: str) -> None:
    """In a fresh interpreter, with the package's ``__init__`` left out (it imports everything),
    importing the module loads none of the modules above it; nor does any import in its functions."""
    code = ("import importlib, json, sys, types\n"
            "package = types.ModuleType('kernelpack'); package.__path__ = [sys.argv[1]]\n"
            "sys.modules['kernelpack'] = package\n"
            "importlib.import_module('kernelpack.' + sys.argv[2])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kernelpack.'))))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), name], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = {m.split(".")[1] for m in json.loads(done.stdout)}
    assert name in loaded and not loaded & FORBIDDEN[name], sorted(loaded & FORBIDDEN[name])
    lazy = {m.split(".")[1] for m in imported(MODULES[f"kernelpack.{name}"], lazy=True)}
    assert not lazy & FORBIDDEN[name], sorted(lazy & FORBIDDEN[name])


def test_files_is_standalone() -> None:
    assert imported(MODULES["kernelpack.files"], lazy=True) == {"kernelpack.errors"}


def test_no_module_level_import_cycle_in_the_package() -> None:
    """Module-level imports only: an import inside a function runs after both modules exist."""
    graph = {name: imported(path, lazy=False) for name, path in MODULES.items()}
    done: set[str] = set()

    def walk(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            walk(other, stack + [name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])


def test_import_kernelpack_stays_light() -> None:
    code = "import json, sys, kernelpack; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "kernelpack.container" not in loaded and not (ROOT / "container.py").exists()


@pytest.mark.parametrize("low, high", [("kernelpack.pack", "kernelpack.converters"),
                                       ("kernelpack.runtime", "kernelpack.ort"),
                                       ("kernelpack.demo", "kernelpack.cli")])
def test_the_cycles_the_issue_named_are_gone_even_inside_functions(low: str, high: str) -> None:
    """The converters build on pack, ort on runtime, the command line on the demo: never the
    other way round, not even by an import inside a function."""
    assert not {m for m in imported(MODULES[low], lazy=True) if m == high or m.startswith(high + ".")}


def test_the_readme_layout_names_every_module_of_the_package() -> None:
    """README's Layout section and the code agree: every module and subpackage is named there."""
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = {word.rstrip(",") for line in layout.splitlines() for word in line.split()}
    top = {p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    top |= {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert not top - named, sorted(top - named)
