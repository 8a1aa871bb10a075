"""The house is one-way: every ``hpr`` module imports only from its own layer or the layers below it, with no
cycle, whether the import sits at the top of the file or inside a function (a lazy import hides a cycle at run
time; it is still one)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hpr"

# Lowest first. A module may import from its own layer and any layer before it.
LAYERS = [
    (
        "foundations",
        [
            "hpr",
            "hpr.cache",
            "hpr.files",
            "hpr.ops",
            "hpr.positions",
            "hpr.metrics",
            "hpr.gen_scoring",
            "hpr.encoding",
            "hpr.threads",
        ],
    ),
    ("data", ["hpr.data"]),
    ("models", ["hpr.models", "hpr.model_sources"]),
    ("toy world", ["hpr.toyworld"]),  # a data-and-model source, nothing more
    ("sources", ["hpr.sources"]),  # names to models, questions and prompt formats
    ("model plumbing", ["hpr.continuations", "hpr.scoring", "hpr.generation", "hpr.activations"]),
    ("editors", ["hpr.editors"]),
    ("evaluation", ["hpr.evaluate", "hpr.capability", "hpr.answers", "hpr.bbq_scores"]),
    ("runs", ["hpr.runs"]),
    ("entry points", ["hpr.cli", "hpr.measurements", "hpr.strength", "hpr.figures", "hpr.toy_diagnose"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every ``hpr`` module ``path`` imports, anywhere in the file; ``from hpr.x import y`` counts as
    ``hpr.x.y`` when ``y`` is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hpr"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hpr":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "hpr" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_or_sideways():
    upward = []
    for module, imports in import_graph().items():
        for target in imports:
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    # A package imports its own submodules when it re-exports them; a submodule importing its package's
    # __init__ back is the cycle to catch, so the edges stay as written.
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_imports(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text(
        "def f():\n    from hpr.runs import RunConfig\n    import hpr.ops\n    from hpr import measurements\n"
    )
    assert imported_modules(lazy) == {"hpr.runs", "hpr.ops", "hpr.measurements"}
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("hpr.somewhere_new")


def test_nothing_below_the_app_imports_the_app_or_the_scripts():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n.split(".")[0] for n in names} & {"app", "analyses", "bench", "tests", "conftest"}, path


def test_importing_hpr_loads_nothing_heavy():
    heavy = "{'torch', 'transformer_lens', 'hpr'}"
    code = f"import sys, hpr; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['hpr']"


def test_no_function_in_hpr_is_over_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert not long, "split these into smaller functions:\n" + "\n".join(long)


def test_git_ignores_no_source_file():
    """A pattern such as ``runs/`` once hid ``hpr/runs/`` from commits: every file passed here, none in a clone."""
    sources = [
        str(p.relative_to(ROOT)) for d in ("hpr", "app", "analyses", "bench", "tests") for p in (ROOT / d).rglob("*.py")
    ]
    out = subprocess.run(["git", "check-ignore", "--no-index", *sources], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and not out.stdout, f"ignored by .gitignore: {out.stdout.split()}"
