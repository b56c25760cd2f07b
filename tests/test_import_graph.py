"""The module graph of src/preftune: no cycle, no import up the layers, and a function-level import
only for a third-party dependency deferred on purpose (with a comment saying why).

The layers are README's "How it is built"; a new module gets a line in LAYERS (a test fails until
it has one), so where it sits is a decision, not an accident.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "preftune"

# lowest layer first; a module may import its own layer or any lower one. The keys are the
# sub-packages of src/preftune (and config.py, which sits beside data: it reads data's registries of
# formats and pairings, and the file -> micro-batch path reads the Config).
LAYERS = {
    0: ["utils"],             # errors, safe IO, environment, progress, devices, sharding, version
    1: ["core"],              # losses, recipes, log-probs, attention, the loss step, health checks, statistics
    2: ["config", "data"],    # settings; file -> records -> tokens -> micro-batches (and reference log-probs)
    3: ["models"],            # loading, sampling, reward sources
    4: ["training"],          # the one loop, checkpoints, in-loop evaluation, probes
    5: ["runs"],              # online/iterative DPO, GRPO, best-of-N, SFT, reward models
    6: ["apps"],              # demo, sweep, serve, label, report, advise, export, eval, the Python API
    7: ["cli", "__main__", ""],  # "" is the package itself (its __init__ re-exports the entry points)
}
LEVEL = {name: level for level, names in LAYERS.items() for name in names}


def _modules(root: Path = SRC) -> dict[str, Path]:
    return {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top not in LEVEL:
        raise AssertionError(f"{module} has no layer in tests/test_import_graph.py LAYERS")
    return LEVEL[top]


def _imports(module: str, path: Path, modules: dict) -> list[tuple[str, int, bool, ast.stmt]]:
    """(imported module, line, inside a function?, node) for every import of a package module."""
    tree, out = ast.parse(path.read_text()), []
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1] if node.level else []
            head = ".".join(base + ([node.module] if node.module else []))
            names = [f"{head}.{a.name}" for a in node.names if f"{head}.{a.name}" in modules] or [head]
        else:
            names = [a.name for a in node.names]
        for name in names:
            out.append((name, node.lineno, id(node) in in_function, node))
    return out


def _graph(root: Path = SRC):
    modules = _modules(root)
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    modules, graph = _graph()
    edges = {m: {t for t, *_ in imps if t in modules and t != m} for m, imps in graph.items()}
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    modules, graph = _graph()
    upward = [f"{m} ({_layer(m)}) -> {t} ({_layer(t)}) line {line}"
              for m, imps in graph.items() for t, line, *_ in imps if t in modules and _layer(t) > _layer(m)]
    assert upward == []


def _function_level(path_module_graph):
    modules, graph = path_module_graph
    found = []
    for m, imps in graph.items():
        lines = modules[m].read_text().splitlines()
        for target, line, inside, _ in imps:
            if not inside:
                continue
            text = lines[line - 1] + (lines[line - 2] if line > 1 else "")
            found.append((m, line, target, target.split(".")[0] == "preftune", "#" in text))
    return found


def test_function_level_imports_only_defer_third_party_dependencies_and_say_why():
    found = _function_level(_graph())
    internal = [f"{m}:{line} imports {t} inside a function" for m, line, t, ours, _ in found if ours]
    silent = [f"{m}:{line} defers {t} without a comment" for m, line, t, ours, why in found if not ours and not why]
    assert internal == [] and silent == []


def test_the_checks_see_an_upward_and_a_hidden_import(tmp_path):
    """The graph checks can fail: a fake package with a function-level upward import trips both."""
    pkg = tmp_path / "preftune"
    for sub in ("utils", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "utils" / "errors.py").write_text("def f():\n    from ..training.train import x\n")
    (pkg / "training" / "train.py").write_text("from ..utils.errors import f\nx = 1\n")
    modules, graph = _graph(pkg)
    edges = {m: {t for t, *_ in imps if t in modules and t != m} for m, imps in graph.items()}
    assert [sorted(c) for c in _cycles(edges)] == [["preftune.training.train", "preftune.utils.errors"]]
    found = _function_level((modules, graph))
    assert [(m, t, ours) for m, _, t, ours, _ in found] == [("preftune.utils.errors", "preftune.training.train", True)]
    upward = [(m, t) for m, imps in graph.items() for t, *_ in imps if t in modules and _layer(t) > _layer(m)]
    assert upward == [("preftune.utils.errors", "preftune.training.train")]


@pytest.mark.parametrize("level", sorted(LAYERS))
def test_every_layer_names_real_modules(level):
    tops = {m.split(".")[1] if "." in m else "" for m in _modules()}
    assert set(LAYERS[level]) <= tops
