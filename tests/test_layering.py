"""Import discipline of the unirec package, checked from source with ast (unirec is never imported).

1. layering: a module imports only its own layer or lower ones; the root package imports only
   unirec._ext / unirec.ops / unirec.nn, and only unirec/__main__.py imports the bare root package;
2. no import cycles among module-level imports, and no pair of modules importing each other at all;
3. no private name (``_x``) or private module imported from a different top-level subpackage
   (unirec._ext, the sanctioned loader of the compiled extension unirec._C, is exempt).
"""
import ast
import functools
from pathlib import Path
from typing import NamedTuple, Optional

PKG = "unirec"
SRC = Path(__file__).resolve().parents[1] / PKG
LAYERS = {"_ext": 0, "ops": 0, "nn": 1, "data": 2, "models": 3, "evaluation": 4, "runs": 4,
          "training": 5, "serving": 6, "cli": 7, "__main__": 7,
          "distributed": 1}
ROOT_MAY_IMPORT = ("_ext", "ops", "nn")


class Imp(NamedTuple):
    importer: str  # dotted name of the importing module (a package's __init__ is the package name)
    file: str  # path relative to the repository root
    line: int
    target: str  # the unirec module imported (for `from P import name` where name is no module: P)
    name: Optional[str]  # the attribute imported from target, if any
    in_func: bool  # inside a function/method body (not executed at import time)

    def where(self):
        return f"{self.file}:{self.line}: imports {self.target}" + (f" (name {self.name})" if self.name else "")


def top(mod):
    """Top-level subpackage of a unirec module: 'models' for unirec.models._impl, '' for the root."""
    return mod.split(".")[1] if "." in mod else ""


def is_module(name, mods, src):
    """A source module or package exists for this dotted name. The compiled extension unirec._C has no
    source: `from . import _C` counts as importing the name _C from the root package, built or not."""
    return name in mods or src.parent.joinpath(*name.split(".")).is_dir()


def walk(node, in_func=False):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_func
        yield from walk(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


@functools.lru_cache(maxsize=None)
def scan(src=SRC):
    """All imports of unirec modules under src, and each package's re-exports {pkg: {name: submodule}}."""
    mods = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    imps, reexports = [], {}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for node, in_func in walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found = [(a.name, None, None) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    keep = len(pkg.split(".")) - node.level + 1
                    if keep <= 0:
                        continue
                    base = ".".join(pkg.split(".")[:keep] + ([node.module] if node.module else []))
                found = [(f"{base}.{a.name}", None, None) if is_module(f"{base}.{a.name}", mods, src)
                         else (base, a.name, a.asname or a.name) for a in node.names]
            for target, name, bound in found:
                if target != PKG and not target.startswith(PKG + "."):
                    continue  # standard library / third party
                imps.append(Imp(mod, str(path.relative_to(src.parent)), node.lineno, target, name, in_func))
                if is_pkg and name and not in_func and target.startswith(mod + "."):
                    reexports.setdefault(mod, {})[bound] = target
    return tuple(imps), reexports


def sanctioned(imp):
    """unirec._ext is the one module that loads the compiled extension unirec._C."""
    return imp.importer == f"{PKG}._ext" and imp.target == PKG and imp.name == "_C"


def layer_violations(src=SRC):
    out = []
    for imp in scan(src)[0]:
        if sanctioned(imp):
            continue
        layer, mine = LAYERS.get(top(imp.target)), LAYERS.get(top(imp.importer))
        if imp.importer == PKG:
            if imp.target == PKG or top(imp.target) not in ROOT_MAY_IMPORT:
                out.append(f"{imp.where()} -- [root] unirec/__init__.py may import only unirec._ext, .ops, .nn")
        elif imp.target == PKG:
            if imp.importer != f"{PKG}.__main__":
                out.append(f"{imp.where()} -- [root] only unirec/__main__.py may import the bare root package")
        elif layer is None or mine is None:
            out.append(f"{imp.where()} -- [layering] {imp.target if layer is None else imp.importer} has no layer")
        elif layer > mine:
            out.append(f"{imp.where()} -- [layering] layer {mine} ({top(imp.importer)}) imports "
                       f"higher layer {layer} ({top(imp.target)})")
    return out


def cycle_violations(src=SRC):
    imps, reexports = scan(src)
    edges = {}  # (importer, imported module) -> [Imp]
    for imp in imps:
        dest = imp.target
        if imp.importer.startswith(imp.target + "."):  # the importer's own package, or a name from it:
            dest = reexports.get(imp.target, {}).get(imp.name)  # -> the submodule defining it, else ignored
        if dest and dest != imp.importer:
            edges.setdefault((imp.importer, dest), []).append(imp)
    graph = {}  # module-level imports only
    for (a, b) in (e for e, recs in edges.items() if any(not r.in_func for r in recs)):
        graph.setdefault(a, set()).add(b)
    out, cycle = [], find_cycle(graph)
    if cycle:
        hops = [next(r for r in edges[(a, b)] if not r.in_func) for a, b in zip(cycle, cycle[1:])]
        out.append("[cycle] module-level import cycle " + " -> ".join(cycle) + ": "
                   + "; ".join(h.where() for h in hops))
    for (a, b), recs in sorted(edges.items()):
        if a < b and (b, a) in edges and not (a in graph.get(b, ()) and b in graph.get(a, ())):
            both = {f"{r.file}:{r.line}" + (" (in a function)" if r.in_func else "") for r in recs + edges[(b, a)]}
            out.append(f"[cycle] {a} and {b} import each other: " + "; ".join(sorted(both)))
    return out


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def private_violations(src=SRC):
    out = []
    for imp in scan(src)[0]:
        if sanctioned(imp) or top(imp.target) in ("_ext", top(imp.importer)):
            continue
        bad = [p for p in imp.target.split(".")[1:] + [imp.name or ""] if p[:1] == "_" and p[:2] != "__"]
        if bad:
            out.append(f"{imp.where()} -- [private] {bad[0]} imported from {top(imp.target) or 'the root package'}"
                       f" into {top(imp.importer) or 'the root package'}")
    return out


def check(violations, rule):  # the real tree: expected to fail until the restructuring is done
    assert not violations, f"{len(violations)} {rule} violation(s):\n" + "\n".join(violations)


def test_layers_import_downward():
    check(layer_violations(), "layering")


def test_no_import_cycles():
    check(cycle_violations(), "import-cycle")


def test_no_private_names_across_packages():
    check(private_violations(), "private-name")


FAKE = {  # a fake unirec tree: one violation of each kind, marked with its rule, and clean imports
    "__init__.py": "from . import ops\ntry:\n    from . import data  # root\nexcept ImportError:\n    pass\n",
    "__main__.py": "import unirec\nfrom .cli import main\n",
    "cli.py": "def main():\n    from .serving import app\n",
    "_ext.py": "from . import _C\n",
    "ops/__init__.py": "from .emb import bag\n",
    "ops/emb.py": "from .. import ops\nfrom .. import _C  # root private\nbag = 1\n",
    "nn/__init__.py": "from .._ext import _C\nfrom ..ops import emb, bag\n",
    "nn/bad.py": "class A:\n    def f(self):\n        from ..models import p  # layering\n",
    "data/__init__.py": "from .a import thing\nfrom .c import other\n",
    "data/a.py": "from .b import x\nthing, _priv = 1, 2\n",
    "data/b.py": "x = 1\ndef f():\n    from .a import thing  # mutual\n",
    "data/c.py": "from . import thing\nother = 2\n",
    "models/__init__.py": "", "models/_impl.py": "op = 1\n", "training/__init__.py": "t = 1\n",
    "models/p.py": "from .q import y  # cycle\nfrom ._impl import op\n",
    "models/q.py": "from . import p  # cycle\ny = 1\n",
    "evaluation/__init__.py": "", "evaluation/x.py": "from ..models._impl import op  # private\n",
    "evaluation/y.py": "from ..data.a import _priv  # private\nfrom ..data import thing\n",
    "serving/__init__.py": "", "serving/app.py": "import unirec.ops.emb\nfrom ..training import t\n",
}


def test_checker_on_synthetic_tree(tmp_path):
    src = tmp_path / PKG
    for rel, text in FAKE.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    layers = {v.split(": ")[0]: v for v in layer_violations(src)}
    assert set(layers) == {"unirec/__init__.py:3", "unirec/ops/emb.py:2", "unirec/nn/bad.py:3"}, layers
    assert "[root]" in layers["unirec/__init__.py:3"] and "[root]" in layers["unirec/ops/emb.py:2"], layers
    assert "[layering] layer 1 (nn) imports higher layer 3 (models)" in layers["unirec/nn/bad.py:3"], layers
    private = private_violations(src)
    assert {v.split(": ")[0] for v in private} == {"unirec/ops/emb.py:2", "unirec/evaluation/x.py:1", "unirec/evaluation/y.py:1"}, private
    cycles = cycle_violations(src)
    assert len(cycles) == 2, cycles
    assert "cycle unirec.models.p -> unirec.models.q -> unirec.models.p" in cycles[0], cycles
    assert "unirec/models/p.py:1" in cycles[0] and "unirec/models/q.py:1" in cycles[0], cycles
    assert cycles[1] == ("[cycle] unirec.data.a and unirec.data.b import each other: "
                         "unirec/data/a.py:1; unirec/data/b.py:3 (in a function)"), cycles
