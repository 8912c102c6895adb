"""Import cycles and private cross-module imports among the project's packages (run from the repo root;
default: esper/ and certify/, or the package folders given as arguments), within a package and between them.
Function-local imports count; `if TYPE_CHECKING:` blocks do not. Exit 1 when any is found.

A copy of the team's shared tool (tools/import_cycles.py), reformatted: tests/test_import_cycles.py runs it, so
a fresh clone needs nothing outside the repository."""

import ast
import pathlib
import sys

roots = [pathlib.Path(a) for a in sys.argv[1:]] or [
    pathlib.Path(r) for r in ("esper", "certify") if pathlib.Path(r, "__init__.py").exists()
]
names = tuple(r.name for r in roots)
mods = {".".join(p.with_suffix("").parts).removesuffix(".__init__"): p for r in roots for p in r.rglob("*.py")}
edges, private = {m: set() for m in mods}, []


def tc(node):  # an `if TYPE_CHECKING:` block
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


for m, p in mods.items():
    tree = ast.parse(p.read_text())
    skip = {id(n) for t in ast.walk(tree) if tc(t) for n in ast.walk(t)}
    pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in names:
                continue
            for a in n.names:
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                if target in mods and target != m:
                    edges[m].add(target)
                if a.name.startswith("_") and not a.name.startswith("__") and target != m:
                    private.append(f"{m} imports {base}.{a.name}")
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name in mods and a.name != m:
                    edges[m].add(a.name)
# package __init__ re-exports are not cycles of their own: drop edges into a package from its own submodules
for m in edges:
    edges[m] = {t for t in edges[m] if not (mods[t].name == "__init__.py" and m.startswith(t + "."))}
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = i[0]
    i[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in edges:
    if v not in index:
        visit(v)
# between the layers of a package (its subpackages and top-level modules, e.g. esper.tezzeret and
# esper.certification): one layer must never import a layer that imports it, even through other modules


def layer(m):
    parts = m.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or mods[m].name == "__init__.py" else m


layers = {}
for a in edges:
    for b in edges[a]:
        la, lb = layer(a), layer(b)
        if la != lb and la.split(".")[0] == lb.split(".")[0]:
            layers.setdefault(la, set()).add(lb)


def reach(a):
    seen, todo = set(), [a]
    while todo:
        for nb in layers.get(todo.pop(), ()):
            if nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return seen


found = set()
for a in sorted(layers):
    for b in sorted(layers[a]):
        if a in reach(b) and (b, a) not in found:
            found.add((a, b))
            sccs.append([f"layer {a}", f"layer {b}"])
# between top-level packages: esper must never import a package that imports esper (a layering cycle)
top = {(a.split(".")[0], b.split(".")[0]) for a in edges for b in edges[a] if a.split(".")[0] != b.split(".")[0]}
for a, b in sorted(top):
    if (b, a) in top and a < b:
        sccs.append([f"package {a}", f"package {b}"])
for c in sccs:
    print("cycle:", " <-> ".join(c))
for p in private:
    print("private:", p)
print(f"{len(sccs)} import cycles, {len(private)} private cross-module imports in {', '.join(n + '/' for n in names)}")
sys.exit(1 if sccs or private else 0)
