"""The import contract: stages depend only downward, sibling stages do not import each other, and
no module takes part in an import cycle (imports inside functions count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ptqcli"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("base", ["errors", "files", "formats", "ops", "recurrent", "parallel", "geometry", "graph", "quant", "plan", "config", "progress",
              "metrics", "numeric", "runtime", "nativelib", "prepare"]),
    ("data", ["calibrate.data"]),
    ("observe", ["calibrate.collect", "calibrate.moments", "calibrate.segments", "calibrate.observers", "calibrate.select"]),
    ("plan", ["calibrate.planner", "calibrate.lstm", "calibrate.branches", "calibrate.bias_correction", "calibrate.probe", "calibrate.settle", "calibrate.smooth",
              "rundir"]),
    ("transform", ["calibrate.layerwise", "calibrate.gptq", "calibrate.synthetic", "masks", "allocate"]),
    ("export", ["export.qdq", "export.nbits", "export.integer_kernels", "export.container", "export.native", "export.native_ref", "export.binarize",
                "export.stream"]),
    ("measure", ["export.fidelity", "export.measures", "export.card", "export.card_render", "export.gate"]),
    # Orchestration: the stages the CLI calls, the Pareto sweep (allocate, export and measure per
    # budget), the accuracy-aware fallback (export and measure per candidate plan) and the CLI's tables.
    ("top", ["stages", "cli", "report", "allocate.pareto", "allocate.target"]),
]
# Within the transform layer, these rooms do not import each other: rounding, synthetic data,
# masks and allocation each stand on the layers below.
SIBLINGS = ["calibrate.layerwise", "calibrate.gptq", "calibrate.synthetic", "masks", "allocate"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("ptqcli"):
                target = node.module.removeprefix("ptqcli").lstrip(".")
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}".lstrip(".")
                found.add(full if full in mods else target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("ptqcli").lstrip(".") for a in node.names if a.name.startswith("ptqcli"))
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _room(module: str, rooms: list[str]) -> str | None:
    """The longest listed prefix that owns `module`."""
    owners = [r for r in rooms if module == r or module.startswith(r + ".")]
    return max(owners, key=len) if owners else None


def _layer(module: str) -> int | None:
    rooms = {room: i for i, (_, names) in enumerate(LAYERS) for room in names}
    owner = _room(module, list(rooms))
    return None if owner is None else rooms[owner]


def test_every_module_has_a_layer():
    # An empty package __init__ (a docstring at most) has nothing to place.
    empty = {m for m, p in _modules().items() if p.name == "__init__.py" and len(ast.parse(p.read_text()).body) <= 1}
    unplaced = sorted(m for m in _modules() if m and m not in empty and _layer(m) is None)
    assert unplaced == [], f"place these modules in a layer of the import contract: {unplaced}"


def test_stages_depend_only_downward():
    upward = [(m, d) for m, deps in _graph().items() for d in deps
              if m and d and _layer(d) > _layer(m)]
    assert upward == [], "imports of a higher layer: " + ", ".join(f"{m} -> {d}" for m, d in upward)


def test_sibling_stages_do_not_import_each_other():
    crossing = []
    for m, deps in _graph().items():
        mine = _room(m, SIBLINGS)
        for d in deps:
            theirs = _room(d, SIBLINGS)
            if mine and theirs and mine != theirs and _room(m, LAYERS[-1][1]) is None:
                crossing.append(f"{m} -> {d}")
    assert crossing == [], "sibling stages importing each other: " + ", ".join(crossing)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_contract_sees_imports_inside_functions(tmp_path):
    """A guard against the checker going blind: it finds a known function-level import."""
    graph = _graph()
    assert "export.card_render" in graph["export.card"]
