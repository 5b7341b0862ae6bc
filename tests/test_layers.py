"""The library's imports point one way: a module imports only modules of its own layer or below,
at module top level, and never in a circle (the layer table is tld/__init__.py's LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tld

ROOT = Path(tld.__file__).resolve().parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def tld_imports(source: str, module: str, is_package: bool = False, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported tld module, line, at top level?) for every import of a tld module in ``source``."""
    tree = ast.parse(source)
    top = set()
    for n in tree.body:  # imports under a top-level `if` or `try` are still top level
        top |= {id(c) for c in ast.walk(n) if isinstance(c, (ast.Import, ast.ImportFrom))} \
            if isinstance(n, (ast.If, ast.Try)) else {id(n)}

    def is_module(dotted: str) -> bool:
        path = root.parent.joinpath(*dotted.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            # `from . import io` imports the module tld.io; `from .io import x` imports tld.io
            names = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names if name == "tld" or name.startswith("tld.")]
    return found


def layer_of(name: str) -> int:
    """The layer of a tld module (a submodule of a package counts as its package)."""
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else ""
    if key not in tld.LAYERS:
        raise KeyError(f"{name} is in no layer of tld.LAYERS")
    return tld.LAYERS[key]


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int, bool]]]:
    graph = {}
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        imports = tld_imports(path.read_text(), mod, path.name == "__init__.py", root)
        graph[mod] = [(m, line, top) for m, line, top in imports if m != mod]
    return graph


def violations(graph: dict) -> list[str]:
    """Upward imports, function-body imports of tld modules and import cycles, as readable lines."""
    bad = []
    for mod, imports in graph.items():
        if mod == "tld":
            continue  # the package itself only lists its submodules (loaded lazily)
        for target, line, top in imports:
            if not top:
                bad.append(f"{mod}:{line} imports {target} inside a function (tld imports go at the top)")
            elif target != "tld" and layer_of(target) > layer_of(mod):
                bad.append(f"{mod}:{line} imports {target}, a higher layer "
                           f"({layer_of(target)} > {layer_of(mod)})")
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict) -> list[list[str]]:
    edges = {m: {t for t, _, _ in imps if t in graph and t != "tld"} for m, imps in graph.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_every_import_between_tld_modules_points_down_and_sits_at_the_top():
    assert violations(import_graph()) == []


def test_every_module_of_tld_has_a_layer():
    for mod in import_graph():
        if mod != "tld":
            layer_of(mod)


def test_the_layer_check_catches_an_upward_import_a_function_body_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "tld"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "diffusion.py").write_text("from .train import train\n")                 # layer 0 -> 4: upward
    (pkg / "samplers.py").write_text("def f():\n    from .diffusion import x\n")   # inside a function
    (pkg / "text.py").write_text("from .cache import y\n")                          # text <-> cache: a cycle
    (pkg / "cache.py").write_text("from . import text\n")
    (pkg / "train.py").write_text("from .models import create\nfrom . import io\n")   # fine: points down
    (pkg / "models" / "__init__.py").write_text("from .uvit import UViT\n")
    (pkg / "models" / "uvit.py").write_text("from ..blocks import Block\n")          # fine: 1 -> 0
    bad = violations(import_graph(pkg))
    assert any("tld.diffusion:1 imports tld.train, a higher layer" in b for b in bad), bad
    assert any("tld.samplers:2 imports tld.diffusion inside a function" in b for b in bad), bad
    assert any(b.startswith("import cycle:") and "tld.text" in b and "tld.cache" in b for b in bad), bad
    assert not any(b.startswith("tld.train") or b.startswith("tld.models") for b in bad), bad


@pytest.mark.parametrize("name", sorted(tld.LAYERS))
def test_every_layered_module_is_reachable_as_an_attribute_of_tld(name):
    # the lazy submodule list covers every module: `tld.gmm` works without importing it first
    assert getattr(tld, name).__name__ == f"tld.{name}"
