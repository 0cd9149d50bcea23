"""The package's shape: imports between `pipeline` modules go one way (no cycle, not even one hidden in a
function body), and every third-party package imported is declared in pyproject.toml."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> list[str]:
    """Absolute names of every import in the file, module level or inside functions."""
    tree, here = ast.parse(path.read_text()), module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]  # `from pipeline import train`
    return names


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {n for n in imported_names(path) if n in known and n != name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return []


def test_no_import_cycle_among_pipeline_modules():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["pipeline.config"] = graph["pipeline.config"] | {"pipeline.training.train"}  # train imports config
    assert find_cycle(graph)


def declared_distributions() -> set[str]:
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower()
            for r in reqs}


# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "lightning_utilities": "lightning"}


def test_every_third_party_import_is_declared():
    declared = declared_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for name, path in modules().items():
        for imported in imported_names(path):
            top = imported.split(".")[0]
            if top and top != "pipeline" and top not in stdlib and top != "__future__":
                dist = DISTRIBUTION.get(top, top).lower()
                if dist not in declared:
                    missing.setdefault(dist, name)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# Private Lightning / DataLoader names seen in this code base; lightning_compat.py is their only home. Also a
# LightningModule's `_trainer` (lightning_compat.attached_trainer) and OmegaConf's `_get_node` (config.py uses
# the public API: OmegaConf.select, OmegaConf.to_container).
PRIVATE = ("_checkpoint_connector", "_logger_connector", "_iterator", "_check_log_dir_exists", "fit_loop",
           "_shutdown_workers", "_active_loop", "_experiment", "_fs", "_wandb_init", "_should_check_val_fx",
           "_data_fetcher", "_broadcast_sigterm_tensor", "_trainer", "_get_node", "_average_model",
           "_latest_update_step", "_swap_models")


def private_names(source: str) -> list[str]:
    """`line .name` / `line 'name'` for each private name of PRIVATE used in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            found.append(f"{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in PRIVATE:  # getattr(x, "_name")
            found.append(f"{node.lineno} {node.value!r}")
    return found


def test_private_lightning_names_only_in_lightning_compat():
    offenders = [f"{name}:{hit}" for name, path in modules().items() if name != "pipeline.training.lightning_compat"
                 for hit in private_names(path.read_text())]
    assert not offenders, f"private Lightning names outside pipeline/training/lightning_compat.py: {offenders}"


def test_the_private_name_check_catches_names_once_used():
    planted = "distributed = self._trainer is not None\nnode = base._get_node(k)\ngetattr(m, '_trainer')\n"
    assert private_names(planted) == ["1 ._trainer", "2 ._get_node", "3 '_trainer'"]
