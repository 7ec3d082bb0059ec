"""The package's import structure, read from the source (every ``import`` and ``from ... import``
of ``megatron_cppo``, also those inside functions).

Proven:
- no import circle between the package's modules;
- each room (a subpackage, or a top-level module) imports only the rooms ``ROOMS`` allows it: the
  room map of CONTRIBUTING.md. In particular nothing below the trainer (rollout/, convert/,
  data/, checkpoint/, models/, ...) imports training/, and convert/ and rollout/ do not import
  each other;
- the check reads what it claims to (a synthetic circle and an upward import are reported).
Not proven: imports made by importlib, or of names a module receives as arguments.
"""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_cppo"

# room -> the rooms it may import (CONTRIBUTING.md "Rooms"); "megatron_cppo" is the package's
# __init__ (its version)
ROOMS = {
    "options": set(), "dtypes": set(), "platform": set(), "megatron_cppo": {"platform"},
    "nn": set(), "ops": set(), "rewards": set(),
    "parallel": {"options", "platform"},
    "algorithms": {"ops", "options"},
    "models": {"nn", "ops", "options", "parallel", "platform", "dtypes"},
    "checkpoint": {"models", "parallel", "dtypes", "megatron_cppo", "platform"},
    "data": {"models", "options", "dtypes", "rewards"},
    "rollout": {"checkpoint", "data", "models", "options", "parallel", "platform", "dtypes"},
    "convert": {"checkpoint", "models", "parallel", "platform", "dtypes", "megatron_cppo"},
    "training": {"algorithms", "checkpoint", "data", "models", "ops", "options", "parallel",
                 "platform", "rewards", "rollout", "dtypes"},
    "train": {"training", "parallel", "platform", "rollout"},  # rollout: its EngineFailure
    "evaluate": {"data", "rewards", "rollout", "convert", "training"},
    "cli": {"train", "convert", "evaluate"},
}


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module (dotted, a package as its name) -> the package modules it imports."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def resolve(name):  # the longest prefix that is a module (a name imported from it)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = collections.defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import sub" imports the submodule sub when there is one
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] == package.name:
                    found = resolve(t)
                    if found and found != name:
                        graph[name].add(found)
        graph.setdefault(name, set())
    return dict(graph)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def forbidden_imports(graph: dict[str, set[str]], rooms: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = room_of(src), room_of(dst)
            if a != b and b not in rooms.get(a, set()):
                bad.append(f"{src} -> {dst}")
    return bad


def test_no_import_circle():
    assert circles(module_graph(PACKAGE)) == []


def test_rooms_import_only_what_the_room_map_allows():
    graph = module_graph(PACKAGE)
    assert set(map(room_of, graph)) == set(ROOMS), "a room is missing from ROOMS"
    assert forbidden_imports(graph, ROOMS) == []


def test_nothing_below_the_trainer_imports_it():
    lower = ("rollout", "convert", "data", "checkpoint", "models", "algorithms", "ops", "nn",
             "parallel", "rewards", "options", "dtypes", "platform")
    assert all(not {"training", "train", "evaluate", "cli"} & ROOMS[r] for r in lower)
    assert "rollout" not in ROOMS["convert"] and "convert" not in ROOMS["rollout"]


def test_the_checks_see_circles_and_upward_imports(tmp_path):
    pkg = tmp_path / "megatron_cppo"
    (pkg / "rollout").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rollout" / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "rollout" / "source.py").write_text(
        "def f():\n    from megatron_cppo.training.batch import Sample\n")
    (pkg / "training" / "batch.py").write_text("from megatron_cppo.training import loop\n")
    (pkg / "training" / "loop.py").write_text("import megatron_cppo.training.batch\n")
    graph = module_graph(pkg)
    assert circles(graph) == [["megatron_cppo.training.batch", "megatron_cppo.training.loop",
                               "megatron_cppo.training.batch"]]
    assert forbidden_imports(graph, {"rollout": set(), "training": {"rollout"}}) == [
        "megatron_cppo.rollout.source -> megatron_cppo.training.batch"]
