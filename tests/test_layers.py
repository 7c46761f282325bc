"""The package's layers point one way (docs/design.md, "Layout"): no import cycles, no import
from a higher layer, no function-local imports of the package, and every module imports
on its own."""

import ast
import pathlib
import subprocess
import sys

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "implicit_kit"

# The layers, bottom up: a module may import only from its own layer or below.
LAYERS = {
    "_solution": 0, "_misc": 0, "data": 0, "_parallel": 0,
    "solvers": 1, "nn": 1, "optimality": 1, "objective": 1,
    "_iterate": 2,
    "_custom_vjp": 3, "_adjoint": 3,
    "_solve": 4,
    "_fixed_point": 5, "_root": 5,
    "homotopy": 6, "_diagnostics": 6, "qp": 6, "_block_cd": 6,
    "projection": 7,
    "regularizers": 7,
    "models": 8, "hyper": 8,
    "train": 9,
    "experiments": 10,
    "__init__": 11, "__main__": 11, "_cli": 11,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    if not base.startswith("implicit_kit"):
        return []
    if node.module is None or node.level and not node.module:
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def _graph():
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        top, local = set(), []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("implicit_kit")]
            if not targets:
                continue
            if node in tree.body:
                top.update(targets)
            else:
                local.append((node.lineno, targets))
        modules[name] = (top, local)
    known = set(modules)
    edges = {m: {t if t in known else t.rsplit(".", 1)[0] for t in top} & known
             for m, (top, _) in modules.items()}
    return modules, edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def test_no_import_cycles():
    _, edges = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if t == m or (m.startswith(t + ".") and t in edges and m in edges[t]):
                continue  # a package's own __init__ re-exporting its modules
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers():
    _, edges = _graph()
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, ts in edges.items() for t in ts
           if _layer(t) > _layer(m) and not m.startswith(t)]
    assert not bad, "\n".join(bad)
    assert set(LAYERS) >= {p.stem if p.is_file() else p.name
                           for p in PACKAGE.iterdir()
                           if p.suffix == ".py" or (p / "__init__.py").exists()}


def test_no_function_local_imports_of_the_package():
    modules, _ = _graph()
    local = [f"{m}:{line} imports {t}" for m, (_, loc) in modules.items()
             for line, t in loc]
    assert not local, "\n".join(local)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module of the package imported first, with no other module of the package
    loaded (all of `implicit_kit` is dropped from `sys.modules` before each import, in
    one fresh interpreter: the third-party packages stay loaded, which changes nothing
    about the package's own import order and saves a JAX import per module; one
    interpreter per module took 129 s of the suite)."""
    names = sorted(m for m in _graph()[1] if m != "implicit_kit.__main__")  # (runs the CLI)
    code = ("import importlib, sys, traceback\n"
            "import diffrax, equinox, jax, lineax, optax, optimistix\n"
            "bad = []\n"
            f"for m in {names!r}:\n"
            "    for k in [k for k in sys.modules if k.split('.')[0] == 'implicit_kit']:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception:\n"
            "        bad.append((m, traceback.format_exc()[-400:]))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
