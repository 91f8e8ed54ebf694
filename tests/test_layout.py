"""The house's layout: the project's import graph (function-level imports included) has no
cycle, and imports run in the design card's direction (models ◄ trainer rooms ◄ commands, tools).

The graph is built with ``ast`` from the source, so a lazy import that hides a cycle from the
interpreter is still an edge here."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "trainer", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for pkg in PACKAGES
        for p in sorted((REPO / pkg).rglob("*.py"))
    }


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names: itself, or the package that holds an attribute."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """Every project module ``module`` imports, at any depth of its code (``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``), each with whether the
    import is only at function level (lazy)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                out[target] = out.get(target, True) and id(node) not in top
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {m: set(imports_of(m, p, modules)) for m, p in modules.items()}
    # Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: a package's
    # __init__ is an edge of every module that imports something inside it.
    for m in list(graph):
        graph[m] |= {
            anc for t in graph[m] for anc in ancestors(t) if anc in graph and anc != m
            and not m.startswith(anc + ".")
        }
    return graph


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path [a, b, ..., a], or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " ► ".join(cycle)


def test_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_models_import_nothing_of_the_trainer_or_tools():
    bad = {
        (m, t) for m, ts in import_graph().items() if m.startswith("models")
        for t in ts if not t.startswith("models")
    }
    assert not bad, f"models/ must stay single-device PyTorch: {sorted(bad)}"


def test_trainer_imports_no_command_nor_tool():
    bad = {
        (m, t) for m, ts in import_graph().items()
        if m.startswith("trainer") and not m.startswith(("trainer.commands", "trainer.cli"))
        and not m.startswith("trainer.__main__")
        for t in ts if t.startswith(("tools", "trainer.commands", "trainer.cli"))
    }
    assert not bad, f"the trainer rooms are below the commands and tools: {sorted(bad)}"


def test_data_imports_neither_evaluation_nor_inference():
    bad = {
        (m, t) for m, ts in import_graph().items() if m.startswith("trainer.data")
        for t in ts if t.startswith(("trainer.evaluation", "tools"))
    }
    assert not bad, f"the data room feeds the loop, it does not evaluate: {sorted(bad)}"


# The rooms from the bottom up: a module imports only modules of its own layer or below.
# ``models`` is single-device PyTorch; the core (errors, families, config, shims) under every
# room; the loop knows no callback; commands and the CLI at the top, above the tools they run.
LAYERS = [
    ["models", "trainer:", "tools:"],  # "x:" the bare package's __init__ (these import nothing)
    ["trainer.errors", "trainer.host_memory", "trainer.deepspeed_private", "trainer.startup"],
    ["trainer.families"],
    ["trainer.config"],
    ["trainer.parallel"],
    ["trainer.accounting"],
    ["trainer.distributed"],
    ["trainer.checkpoint"],
    ["trainer.data"],
    ["trainer.engine"],
    ["trainer.build"],
    ["trainer.loop"],
    ["trainer.evaluation"],
    ["trainer.callbacks"],
    ["trainer.train", "trainer.launch"],
    ["tools"],
    ["trainer.commands", "trainer.cli", "trainer.__main__"],
]


def layer_of(module: str) -> int:
    """The layer of the longest entry naming ``module`` or a package above it."""
    def names(entry: str) -> bool:
        if entry.endswith(":"):
            return module == entry[:-1]
        return module == entry or module.startswith(entry + ".")

    hits = [(len(entry), i) for i, layer in enumerate(LAYERS) for entry in layer if names(entry)]
    assert hits, f"{module} belongs to no layer of tests/test_layout.py: add it"
    return max(hits)[1]


def test_imports_go_down_the_layers():
    bad = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, ts in import_graph().items() for t in ts if layer_of(t) > layer_of(m)
    )
    assert not bad, "imports against the rooms' order:\n" + "\n".join(bad)


HEAVY = ("deepspeed", "mlflow", "lm_eval", "transformers", "matplotlib", "scipy", "sacrebleu", "datasets")
"""Third-party packages that cost a noticeable part of a second or more to import."""


def heavy_modules() -> set[str]:
    """Project modules whose import (at module level, transitively) imports a HEAVY package."""
    modules = project_modules()
    direct = set()
    for m, p in modules.items():
        tree = ast.parse(p.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] in HEAVY for n in names):
                direct.add(m)
    eager = {m: {t for t, lazy in imports_of(m, p, modules).items() if not lazy} for m, p in modules.items()}
    heavy, grew = set(direct), True
    while grew:
        new = {m for m, ts in eager.items() if ts & heavy} - heavy
        heavy |= new
        grew = bool(new)
    return heavy


def test_function_level_imports_only_for_start_up():
    """A project module is imported inside a function only where that keeps start-up fast: the
    CLI loads each command's implementation when it runs, and a heavy module (HEAVY above)
    waits until it is needed. Anything else belongs at the top, where the graph shows it."""
    modules, heavy = project_modules(), heavy_modules()
    bad = sorted(
        f"{m} imports {t} inside a function"
        for m, p in modules.items() if not m.startswith(("trainer.commands", "trainer.cli"))
        for t, lazy in imports_of(m, p, modules).items() if lazy and t not in heavy
    )
    assert not bad, "\n".join(bad)
