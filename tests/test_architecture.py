"""The package keeps the shape docs/architecture.md describes, read from the source (imports inside
functions included): layers import only downward, no import cycle, no module reaches for another's
private names, at most 10 modules at the top, no file over 400 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastflat"
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 10

# Higher imports lower (or its own layer), never the reverse; the longest matching prefix decides.
LAYERS = {
    "fastflat.version": 0, "fastflat.errors": 0, "fastflat.flat": 0, "fastflat.settings": 0,
    "fastflat.ops.kernels": 1,
    "fastflat.ops": 2,
    "fastflat.data": 3, "fastflat.runs": 3,
    "fastflat.loss": 4,
    "fastflat.methods": 5, "fastflat.optim": 5,
    "fastflat.config": 6, "fastflat.load": 6,  # assembled from the methods' own settings; saved runs read back
    "fastflat.geometry": 7, "fastflat.analysis": 7,
    "fastflat.loop": 8,
    "fastflat.bench": 9,
    "fastflat.cli": 10,
    "fastflat": 11, "fastflat.__main__": 11,  # the public API on top
}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (annotations only: no import at run time)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the fastflat modules it imports; and every `from a import _private` across modules."""
    edges, private = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastflat") and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        targets.add(full)
                    else:
                        targets.add(node.module)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                            private.append(f"{name} imports {node.module}.{alias.name}")
        edges[name] = targets - {name}
    return edges, private


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    assert all(_layer(m) is not None for m in _modules())


def test_imports_only_go_down_the_layers():
    edges, _ = _imports(_modules())
    upward = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, bs in edges.items() for b in bs if _layer(b) > _layer(a)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges, _ = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    _, private = _imports(_modules())
    assert private == []


def test_the_top_of_the_package_holds_at_most_ten_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_file_is_longer_than_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_a_cycle_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with ops importing cli, and a <-> b."""
    package = tmp_path / "fastflat"
    (package / "ops").mkdir(parents=True)
    (package / "cli").mkdir()
    for path, text in {"__init__.py": "", "ops/__init__.py": "from fastflat.cli import app\n",
                       "cli/__init__.py": "app = 1\n", "a.py": "def f():\n    from fastflat.b import g\n",
                       "b.py": "from fastflat.a import f, _hidden\n"}.items():
        (package / path).write_text(text)
    monkeypatch.setitem(LAYERS, "fastflat.a", 0)
    monkeypatch.setitem(LAYERS, "fastflat.b", 0)
    edges, private = _imports(_modules(package))
    assert "fastflat.cli" in edges["fastflat.ops"] and _layer("fastflat.cli") > _layer("fastflat.ops")
    assert "fastflat.b" in edges["fastflat.a"] and "fastflat.a" in edges["fastflat.b"]
    assert private == ["fastflat.b imports fastflat.a._hidden"]

