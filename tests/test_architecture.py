"""The shape of the package: dependencies point down and never run in a circle, modules stay
short enough to read in one sitting, one training loop serves every fine-tuning, and the
registries are the one place a loss or a dataset layout is added."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "feedbackcam"

# Layers, lowest first; a module may import from its own layer or any lower one.
# data -> the wrapper and pure maths -> models and losses -> the objective -> the training loop
# -> the experiments -> the benchmark and demo -> the app -> the command line.
RANK = {
    "fileio": 0,
    "imageio": 0,
    "data": 0,
    "self_explaining": 1,
    "batchnorm_fold": 1,
    "cam": 1,
    "metrics": 1,
    "selection": 1,
    "augment": 1,
    "distributed": 1,
    "counterfactual": 1,
    "report": 1,
    "models": 2,
    "pretrained": 2,
    "keras_import": 2,
    "losses": 2,
    "checkpoint": 3,
    "explain": 3,
    "objective": 3,
    "clarc": 3,
    "propagate": 3,
    "decision": 3,
    "suspicion": 4,
    "clusters": 4,
    "train": 4,
    "balance": 5,
    "evaluate": 5,
    "base": 5,
    "simulate": 5,
    "simulation_data": 5,
    "options": 5,
    "reliance": 5,
    "shortcuts": 6,
    "demo": 6,
    "service": 7,
    "cli": 8,
}
MAX_LINES = 600


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path):
    """(imported module, names) for every import of this package in ``path``, at the top or
    inside a function (a lazy import is a dependency too)."""
    here = _module(path)
    package = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("feedbackcam"):
                names = [a.name for a in node.names]
                # "from . import x" / "from .data import synth": x may be a module itself
                submodules = [n for n in names if f"{module}.{n}" in MODULES]
                for name in submodules:
                    yield f"{module}.{name}", []
                if len(submodules) < len(names):
                    yield module, [n for n in names if n not in submodules]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("feedbackcam"):
                    yield a.name, []


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for module, _ in _imports(path):
            while module and module not in MODULES:  # feedbackcam.x.Name -> feedbackcam.x
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                targets.add(module)  # a package's own __init__ is not a dependency cycle
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_down():
    bad = []
    for here, path in MODULES.items():
        unit = _unit(here)
        if unit not in RANK:
            continue
        for module, names in _imports(path):
            target = _unit(module)
            if target in RANK and RANK[target] > RANK[unit]:
                bad.append(f"{here} imports {module}")
            if target == "simulate" and unit != "simulate":
                bad += [f"{here} imports private {n} from simulate" for n in names if n[0] == "_"]
    assert not bad, "\n".join(bad)


def test_every_module_has_a_rank():
    units = {_unit(m) for m in MODULES}
    assert units - {"feedbackcam", "__main__"} <= set(RANK), units - set(RANK)


def test_modules_are_short_enough_to_read_in_one_sitting():
    long = {
        name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def _calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name | ast.Attribute)
    ]


def test_one_training_loop_serves_every_fine_tuning():
    """Base training, the simulations (baseline and fine-tuning) and the benchmark (baseline and
    ceiling, fine-tuning, A-ClArC's fine-tuning) run their epochs through ``train_epochs``, the
    app's updates their steps through ``run_steps``; none calls ``feedback_step`` in a loop of
    its own."""
    users = {
        "base.py": ("train_epochs", 1),
        "simulate.py": ("train_epochs", 2),
        "shortcuts/bench.py": ("train_epochs", 3),
        "service/update.py": ("run_steps", 1),
    }
    for name, (loop, count) in users.items():
        called = _calls(PACKAGE / name)
        assert called.count(loop) == count, (name, loop)
        assert "feedback_step" not in called and "train_one_epoch" not in called, name
    stepping = sorted(
        _module(p) for p in PACKAGE.rglob("*.py") if "feedback_step" in _calls(p)
    )  # the loop itself, and the loss-scale calibration (one step per probe batch, no update)
    assert stepping == ["feedbackcam.balance", "feedbackcam.train"], stepping
