"""The import-layer rule, checked by parsing every module's imports (``ast``, imports inside functions included).

Layers, lowest first. A module may import modules of its own layer and of lower layers, never of a higher one,
and the module graph has no cycle (within a layer either):

0. foundation  errors, io, layout, options, classpath, machine, progress, distributed, checkpoints, callbacks,
               contracts: file names, atomic files, option checks, errors and process plumbing; import nothing above.
1. core        data_modules, lsgs.nn, lsgs.kmeans, lsgs.metrics, lsgs.reports.tables, lsgs.reports.figures:
               data sets, pure torch nets and maths, metrics, tables and pictures; no Lightning model, no run.
2. evaluation  lsgs.evaluation: the model-agnostic harness (calibration, metrics, outputs) and load_method.
3. stages      lsgs.modules: the LSGS LightningModules (VQVAE, aggregator, transformers, ScoringModule).
4. methods     lsgs.methods: the other evaluated methods (baseline kind, contenders) and the method registry.
5. inference   lsgs.inference: the Inferencer and the export writer (a method's graphs from the layers below; the
               export runtime itself imports only core modules).
6. stage_cli   lsgs.stage_cli: one stage from its LightningCLI config (parse, check, instantiate).
7. run         lsgs.run: experiment parser, planner (hash, skip, invalidate), runner, loggers.
8. reports     lsgs.reports (summary, html): the report of a run folder.
9. commands    lsgs.cli, lsgs.__main__, lsgs.pipeline, lsgs.ablations, lsgs.detect, lsgs.export, lsgs.study: the
               ``lsgs`` commands, each a thin main over the layers below.

And one source of truth: a run-folder file name is spelled only by ``lsgs/layout.py``, a data-cache file name only
by ``data_modules/cache.py``, a whole choice list (a module constant such as ``MAP_REFERENCES``) only by the module
that declares it, and the old name of the methods (the word the registry refuses) only by that refusal.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"lsgs": REPO / "src" / "lsgs", "data_modules": REPO / "data_modules"}

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("lsgs", "lsgs.errors", "lsgs.io", "lsgs.layout", "lsgs.options", "lsgs.run_record",
                    "lsgs.classpath", "lsgs.machine", "lsgs.progress", "lsgs.distributed", "lsgs.checkpoints",
                    "lsgs.callbacks", "lsgs.contracts")),
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
    "scores.csv", "thresholds.json", "videos", "checkpoints", "heatmaps", "curves", "studies", "ablations",
    "methods", "exports", "metadata.json",
}  # fmt: skip
LAYOUT_MODULE = "lsgs.layout"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip


def spelled_names(path: Path, names: Iterable[str]) -> set[str]:
    """The ``names`` spelled as whole string constants in ``path`` (docstrings and comments do not count)."""
    names = set(names)
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstring_nodes(tree)
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    }


def run_folder_literals(path: Path) -> set[str]:
    """Run-folder names spelled as string constants in ``path``."""
    return spelled_names(path, RUN_FOLDER_NAMES)


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


# ------------------------------------------------------------------------------------------ data-cache file names
CACHE_MODULE = "data_modules.cache"


def cache_file_names() -> set[str]:
    """Every file name of a data-cache entry, as ``data_modules/cache.py`` declares them."""
    from data_modules import cache

    arrays = {cache.array_path(".", name).name for name in (cache.IMAGES, cache.MASKS, cache.ROI)}
    return arrays | {cache.INDEX_FILE, cache.COMPLETE_MARKER, cache.OWNER_FILE}


def test_the_cache_file_names_are_the_ones_the_cache_writes() -> None:
    assert cache_file_names() == {"images.npy", "masks.npy", "roi.npy", "index.json", "COMPLETE", ".owner.json"}


def test_only_the_cache_module_spells_cache_file_names() -> None:
    names = cache_file_names()
    spelled = {
        name: sorted(found)
        for name, path in discover_modules().items()
        if name != CACHE_MODULE and (found := spelled_names(path, names))
    }
    assert spelled == {}


# ------------------------------------------------------------------------------------------ choice lists


def _string_list(node: ast.AST) -> frozenset[str] | None:
    """The strings of a tuple, list or set literal of at least two string constants, else None."""
    if not isinstance(node, ast.Tuple | ast.List | ast.Set) or len(node.elts) < 2:
        return None
    if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return None
    return frozenset(e.value for e in node.elts)


def declared_lists(modules: Mapping[str, Path]) -> dict[frozenset[str], list[str]]:
    """Choice lists and other declared lists: each module-level UPPER_CASE constant that is a literal of strings
    (``MAP_REFERENCES = ("reconstruction", "input")``), and each literal a module passes to ``one_of``; the value
    (as a set: a reordered copy is a copy too) -> ``["module.NAME", ...]``, its declarations."""
    declared: dict[frozenset[str], list[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            value = getattr(node, "value", None)
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and (found := _string_list(value)):
                    declared.setdefault(found, []).append(f"{module}.{target.id}")
        for node in ast.walk(tree):
            is_one_of = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "one_of" and node.args
            if is_one_of and (found := _string_list(node.args[0])):
                declared.setdefault(found, []).append(f"{module}.one_of")
    return declared


def copied_lists(modules: Mapping[str, Path]) -> list[str]:
    """Every literal in a module that equals a list another module declares (anywhere: expressions, defaults,
    ``Literal[...]`` annotations), and every list declared by two modules, as ``module:line copies owner``."""
    declared = declared_lists(modules)
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            owners = declared.get(_string_list(node) or frozenset(), [])
            others = [owner for owner in owners if owner.rpartition(".")[0] != module]
            if others:
                found.append(f"{module}:{node.lineno} copies {', '.join(others)}")
    return sorted(found)


def test_the_choice_list_checker_sees_a_copy(tmp_path: Path) -> None:
    owner, user, other = tmp_path / "owner.py", tmp_path / "user.py", tmp_path / "other.py"
    owner.write_text('MODES = ("a", "b")\nCHECK = one_of(("x", "y", "z"))\nuse = "a" in MODES\n')
    user.write_text('from typing import Literal\ndef f(m: Literal["b", "a"] = "a"):\n    return m in ["z", "y", "x"]\n')
    other.write_text('KINDS = ["a", "c"]\nsubset = ("a",)\n')
    modules = {"pkg.owner": owner, "pkg.user": user, "pkg.other": other}
    assert declared_lists(modules) == {
        frozenset("ab"): ["pkg.owner.MODES"], frozenset("xyz"): ["pkg.owner.one_of"],
        frozenset("ac"): ["pkg.other.KINDS"],
    }  # fmt: skip
    assert copied_lists(modules) == ["pkg.user:2 copies pkg.owner.MODES", "pkg.user:3 copies pkg.owner.one_of"]


def test_only_the_owner_spells_a_choice_list() -> None:
    assert copied_lists(discover_modules()) == []
    declared = declared_lists(discover_modules())
    # The lists the options are checked against are among them (declared by their owners).
    for choices, owner in ((("reconstruction", "input"), "lsgs.nn.restoration.MAP_REFERENCES"),
                           (("all", "category"), "lsgs.modules.scoring.NLL_THRESHOLD_SCOPES"),
                           (("all", "roi"), "lsgs.evaluation.harness.METRIC_REGIONS"),
                           (("max", "topk_mean"), "lsgs.nn.image_score.IMAGE_SCORES"),
                           (("global", "causal"), "lsgs.nn.transformer.ATTENTION_TYPES")):  # fmt: skip
        assert declared[frozenset(choices)] == [owner]


# ------------------------------------------------------------------------------------------ the old methods key
REGISTRY = REPO / "src" / "lsgs" / "methods" / "registry.py"
# Where the old word is searched: code, configs and tests (file contents and file names).
OLD_WORD_ROOTS = ("src", "data_modules", "experiments", "tests")
OLD_WORD_SUFFIXES = (".py", ".yaml", ".yml", ".sbatch", ".sh", ".toml", ".json", ".md", ".txt")
# A test that checks the refusal itself has to spell the old word: a test function with this in its name.
REFUSAL_TEST = "old_methods_key"


def refused_word(registry: Path = REGISTRY) -> str:
    """The old name of the methods, as the one refusal spells it: ``old = "<word>"`` in
    ``refuse_old_methods_key``."""
    tree = ast.parse(registry.read_text(), filename=str(registry))
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "refuse_old_methods_key")
    return next(
        node.value.value
        for node in ast.walk(function)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        and [getattr(t, "id", None) for t in node.targets] == ["old"]
    )  # fmt: skip


def _refusal_test_lines(path: Path) -> set[int]:
    """Lines of the test functions that check the refusal (their name holds REFUSAL_TEST)."""
    if path.suffix != ".py":
        return set()
    return {
        line
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.FunctionDef) and REFUSAL_TEST in node.name
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }


def old_word_uses(repo: Path, word: str, registry: Path) -> list[str]:
    """``path:line`` of every use of ``word`` (any case, also inside longer words and in file names) under the
    searched roots, except the refusal's own line in ``registry`` and the lines of the refusal tests."""
    pattern = re.compile(re.escape(word), re.IGNORECASE)
    found = []
    for root in OLD_WORD_ROOTS:
        for path in sorted((repo / root).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(repo)
            if pattern.search(str(relative)):
                found.append(f"{relative} (file name)")
            if path.suffix not in OLD_WORD_SUFFIXES:
                continue
            allowed = _refusal_test_lines(path) if root == "tests" else set()
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                refusal = path == registry and line.strip() == f'old = "{word}"'
                if pattern.search(line) and not refusal and number not in allowed:
                    found.append(f"{relative}:{number}")
    return found


def test_the_old_word_checker_sees_a_use(tmp_path: Path) -> None:
    registry = tmp_path / "src" / "lsgs" / "methods" / "registry.py"
    registry.parent.mkdir(parents=True)
    registry.write_text('def refuse_old_methods_key(argv):\n    old = "zebras"\n    return old\n')
    assert refused_word(registry) == "zebras"
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "x.yaml").write_text("a: 1\n# run the Zebras too\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_zebras.py").write_text(
        'def test_the_old_methods_key_is_refused():\n    assert "zebras"\n\ndef test_other():\n    x = "zebras"\n'
    )
    assert old_word_uses(tmp_path, "zebras", registry) == [
        "experiments/x.yaml:2", "tests/test_zebras.py (file name)", "tests/test_zebras.py:5"
    ]  # fmt: skip


def test_the_old_methods_word_appears_only_in_its_refusal() -> None:
    word = refused_word()
    assert word.isalpha() and len(word) > 3
    assert old_word_uses(REPO, word, REGISTRY) == []
