"""The layout's rules, checked on the source: imports point down the pipeline and never form a circle."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "mnist_classifier"
# Stages from the bottom up; a module may import its own package and the stages below it, never beside or above.
STAGES = {
    "errors": 0, "fileio": 0.5, "__init__": 0, "cpuload": 0, "supervision": 0, "terminal": 0, "device": 1, "runs": 1,
    "native": 1,
    # config takes the data stage's limits and choices (MAX_PIXELS, PREPROCESSES); models read the config
    "data": 2, "config": 2.5, "models": 3, "evaluation": 4, "inference": 4, "training": 5, "serving": 6,
    "experiments": 6,
    "cli": 7, "__main__": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports resolved), for every module in the package."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                stem = base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
                targets = [".".join(stem)] if node.module else [".".join(stem + [a.name]) for a in node.names]
                found.update(t for t in targets if t)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_classifier."):
                found.add(node.module.removeprefix("mnist_classifier."))
        graph[name] = found
    return graph


def _known(graph: dict[str, set[str]], target: str) -> str:
    """A module or a name inside one (``from .data import load_dataset``) -> the module."""
    while target and target not in graph:
        target = target.rpartition(".")[0]
    return target


def test_every_import_points_down_the_pipeline():
    graph = _imports()
    wrong = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in filter(None, (_known(graph, t) for t in targets)):
            other = target.split(".")[0]
            if other != top and STAGES[other] >= STAGES[top]:
                wrong.append(f"{module} -> {target}")
    assert set(STAGES) >= {m.split(".")[0] for m in graph}, "a new top-level module needs a stage in STAGES"
    assert not wrong, f"imports that point up or sideways: {wrong}"


def test_no_module_imports_one_that_imports_it_back():
    raw = _imports()
    graph = {m: {_known(raw, t) for t in ts} - {""} for m, ts in raw.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            # a package's __init__ re-exports its modules: importing the package is not a circle through it
            if target == module or module.startswith(target + "."):
                continue
            assert state.get(target) != 1, f"import circle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
