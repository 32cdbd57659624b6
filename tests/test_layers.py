"""The layering of docs/architecture.md, checked on the import graph of tokax/ (every import,
at module level or inside a function): which layer may import which, and no import circle
between modules."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tokax"
LEAVES = {"errors", "console"}
ALLOWED = {  # layer -> the layers it may import (besides itself, the leaves and tokax/__init__)
    "kernels": set(),
    "tokenize": set(),
    "data": {"tokenize"},
    "model": {"kernels", "tokenize"},
    "decode": {"model", "kernels", "tokenize", "data"},
    "train": {"model", "kernels", "tokenize", "data"},
    "jobs": {"model", "kernels", "tokenize", "data", "decode", "train"},
    "run": {"jobs"},
    "errors": set(),
    "console": set(),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported tokax module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "tokax" or n.startswith("tokax."):
                out.append((n, id(node) in top))
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph():
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    edges = {}
    for name, path in mods.items():
        edges[name] = []
        for target, at_top in imports(path):
            while target not in mods and "." in target:  # "from tokax.x import name": the module tokax.x
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name:
                edges[name].append((target, at_top))
    return mods, edges


def test_layers_import_only_what_they_may():
    _, edges = graph()
    bad = []
    for src, targets in edges.items():
        a = layer(src)
        if a in ("", "testing"):
            continue
        for dst, _ in targets:
            b = layer(dst)
            if b and b != a and b not in LEAVES and b not in ALLOWED[a]:
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_no_import_circle():
    """No cycle among the modules' imports, function-level imports included (a cycle there is
    still two modules that know each other)."""
    _, edges = graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m, _ in edges.get(n, []):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif state.get(m) is None:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if state.get(n) is None:
            visit(n)
    assert not cycles, "import circles: " + "; ".join(cycles)
