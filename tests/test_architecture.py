"""The import-layer rule, checked by parsing every module's imports (``ast``, imports inside functions included).

Layers, lowest first. A module may import modules of its own layer and of lower layers, never of a higher one,
and the module graph has no cycle (within a layer either):

0. foundation  errors, io, layout, classpath, machine, progress, distributed, checkpoints, callbacks, contracts:
               file names, atomic files, errors and process plumbing; import nothing above.
1. core        data_modules, lsgs.nn, lsgs.kmeans, lsgs.metrics, lsgs.reports.tables, lsgs.reports.figures:
               data sets, pure torch nets and maths, metrics, tables and pictures; no Lightning model, no run.
2. evaluation  lsgs.evaluation: the model-agnostic harness (calibration, metrics, outputs) and load_method.
3. stages      lsgs.modules: the LSGS LightningModules (VQVAE, aggregator, transformers, ScoringModule).
4. methods     lsgs.methods: the other evaluated methods (baselines, contenders) and the method registry.
5. inference   lsgs.inference: the Inferencer and the export writer (a method's graphs from the layers below; the
               export runtime itself imports only core modules).
6. stage_cli   lsgs.stage_cli: one stage from its LightningCLI config (parse, check, instantiate).
7. run         lsgs.run: experiment parser, planner (hash, skip, invalidate), runner, loggers.
8. reports     lsgs.reports (summary, html): the report of a run folder.
9. commands    lsgs.cli, lsgs.__main__, lsgs.pipeline, lsgs.ablations, lsgs.detect, lsgs.export, lsgs.study: the
               ``lsgs`` commands, each a thin main over the layers below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"lsgs": REPO / "src" / "lsgs", "data_modules": REPO / "data_modules"}

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("lsgs", "lsgs.errors", "lsgs.io", "lsgs.layout", "lsgs.run_record", "lsgs.classpath",
                    "lsgs.machine", "lsgs.progress", "lsgs.distributed", "lsgs.checkpoints", "lsgs.callbacks",
                    "lsgs.contracts")),
    ("core", ("data_modules", "lsgs.nn", "lsgs.kmeans", "lsgs.metrics", "lsgs.reports.tables",
              "lsgs.reports.figures", "lsgs.reports.__init__")),
    ("evaluation", ("lsgs.evaluation",)),
    ("stages", ("lsgs.modules",)),
    ("methods", ("lsgs.methods",)),
    ("inference", ("lsgs.inference",)),
    ("stage_cli", ("lsgs.stage_cli",)),
    ("run", ("lsgs.run",)),
    ("reports", ("lsgs.reports",)),
    ("commands", ("lsgs.cli", "lsgs.__main__", "lsgs.pipeline", "lsgs.ablations", "lsgs.detect", "lsgs.export",
                  "lsgs.study")),
)  # fmt: skip
# Cycles tolerated for now (each entry a set of modules); none left. An entry whose cycle is gone fails the test.
KNOWN_CYCLES: tuple[set[str], ...] = ()


# ------------------------------------------------------------------------------------------ graph and checker


def discover_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package roots (``pkg/__init__.py`` -> ``pkg``)."""
    modules = {}
    for root_name, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [root_name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level, functions, ``TYPE_CHECKING`` blocks)."""
    known = set(known)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import pkg.mod.Class`-like paths -> the module part
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = discover_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int:
    """Index of the layer whose longest prefix matches ``module`` (``lsgs`` alone matches only the package)."""
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact_only = prefix in ("lsgs", "lsgs.reports.__init__")
            target = "lsgs.reports" if prefix == "lsgs.reports.__init__" else prefix
            matches = module == target if exact_only else module == prefix or module.startswith(prefix + ".")
            if matches and len(target) > best_length:
                best, best_length = index, len(target)
    if best < 0:
        raise KeyError(f"module {module} has no layer: add it to LAYERS in tests/test_architecture.py")
    return best


def upward_imports(graph: Mapping[str, set[str]], layer: Mapping[str, int]) -> list[str]:
    """Every import from a module to a module of a higher layer, as ``a (layer) -> b (layer)`` lines."""
    return sorted(
        f"{a} ({layer[a]}) -> {b} ({layer[b]})" for a, targets in graph.items() for b in targets if layer[b] > layer[a]
    )


def cycles(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# --------------------------------------------------------------------------------------------------- tests


def test_the_checker_rejects_an_upward_import_and_a_cycle() -> None:
    """The same functions on a synthetic graph: they must see what they are there to see."""
    layers = (("low", ("a",)), ("high", ("b", "c")))
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}}
    layer = {m: layer_of(m, layers) for m in graph}
    assert upward_imports(graph, layer) == ["a (0) -> b (1)"]
    assert cycles(graph) == [{"b", "c"}]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [{"x", "y", "z"}]


def test_imports_are_found_inside_functions_and_relative(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\nfrom lsgs.errors import ConfigError\n"
        "def f():\n    from lsgs.run import plan\n    import lsgs.reports.figures as fig\n"
        "from . import sibling\n"
    )
    known = {"lsgs", "lsgs.errors", "lsgs.run", "lsgs.run.plan", "lsgs.reports", "lsgs.reports.figures",
             "lsgs.run.sibling"}  # fmt: skip
    assert imports_of("lsgs.run.mod", source, known) == {
        "lsgs.errors", "lsgs.run.plan", "lsgs.reports.figures", "lsgs.run.sibling"
    }  # fmt: skip


def test_every_module_has_a_layer() -> None:
    for module in discover_modules():
        layer_of(module)  # raises KeyError naming the module


def test_no_import_goes_up_a_layer() -> None:
    graph = import_graph()
    layer = {m: layer_of(m) for m in graph}
    assert upward_imports(graph, layer) == []


def test_the_import_graph_has_no_cycle() -> None:
    found = cycles(import_graph())
    assert [c for c in found if c not in KNOWN_CYCLES] == []
    # A known cycle that is gone must leave the list too, so the list cannot go stale.
    assert all(known in found for known in KNOWN_CYCLES)


# Names of run-folder files and folders; only lsgs/layout.py may spell them (as whole string constants).
RUN_FOLDER_NAMES = {
    "run.json", "experiment.yaml", "results.json", "results.csv", "results.md", "summary.md", "summary.csv",
    "report.html", "done.json", "stage.json", "config.yaml", "last.ckpt", "vqvae.ckpt", "aggregated.ckpt",
    "vqvae_ft.ckpt", "transformer.ckpt", "aggregation.json", "calibration.json", "image_scores.csv", "curves.npz",
    "scores.csv", "thresholds.txt", "checkpoints", "heatmaps", "curves", "studies", "ablations", "methods",
    "exports", "metadata.json",
}  # fmt: skip
LAYOUT_MODULE = "lsgs.layout"


def run_folder_literals(path: Path) -> set[str]:
    """Run-folder names spelled as string constants in ``path`` (docstrings and comments do not count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in RUN_FOLDER_NAMES and id(node) not in docstrings
    }


def test_run_folder_literal_finder(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text('"""done.json in a docstring"""\nx = "done.json"\ny = path / "heatmaps" / "a.png"\n')
    assert run_folder_literals(source) == {"done.json", "heatmaps"}


def test_only_the_layout_spells_run_folder_names() -> None:
    spelled = {
        name: sorted(found)
        for name, path in discover_modules().items()
        if name != LAYOUT_MODULE and (found := run_folder_literals(path))
    }
    assert spelled == {}
