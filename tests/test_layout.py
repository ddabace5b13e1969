"""The house rules of the package layout, checked on the source itself.

* Every module imports on its own in a fresh interpreter (an import cycle shows up
  as a module that cannot be imported first).
* No import cycle between our modules, counting imports inside functions too (a
  lazy import hides a cycle until the function runs).
* Dependencies point one way: ``simulations -> strategies -> fedlora``; the shared
  core ``fedlora`` does not import its client side ``fedlora.client``, and the
  server never imports the client side.
* Validating a run's config imports neither torch nor Flower.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "strategies", "simulations")
LEVEL = {"fedlora": 0, "strategies": 1, "simulations": 2}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _owner(dotted: str) -> str | None:
    """The module of ours that ``dotted`` (a module or ``module.name``) lives in."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (never executed)."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(sub) for sub in ast.walk(node))
    return hidden


def imports_of(name: str) -> set[str]:
    """Our modules that ``name`` imports anywhere in its body, at run time."""
    tree = ast.parse(MODULES[name].read_text())
    hidden = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            owner = _owner(target)
            if owner is not None and owner != name:
                found.add(owner)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports_it_must() -> None:
    """Control: known edges are found (top level, in a function, ``import a.b``)."""
    assert "fedlora.config" in GRAPH["strategies.config"]
    assert "fedlora.client.private_round" in GRAPH["fedlora.client.round"]  # lazy
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]
    ]


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_dependencies_point_one_way() -> None:
    """simulations -> strategies -> fedlora, core never -> client, server never ->
    client."""
    wrong = []
    for src, targets in GRAPH.items():
        for dst in targets:
            top_src, top_dst = src.split(".")[0], dst.split(".")[0]
            client = "fedlora.client"
            if LEVEL[top_dst] > LEVEL[top_src]:
                wrong.append(f"{src} -> {dst} (imports upward)")
            elif top_src == "fedlora" and not src.startswith(client):
                if dst.startswith(client):
                    wrong.append(f"{src} -> {dst} (shared core imports the client)")
            elif top_src == "strategies" and dst.startswith(client):
                wrong.append(f"{src} -> {dst} (server imports the client)")
    assert wrong == []


def _import_alone(name: str) -> tuple[str, int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return name, proc.returncode, proc.stderr[-600:]


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_alone, sorted(MODULES)))
    failed = [f"{name}: {err}" for name, rc, err in results if rc != 0]
    assert failed == []


def test_validating_a_config_imports_no_torch_or_flower() -> None:
    code = (
        "import sys\n"
        "from strategies.config import ExperimentConfig\n"
        "ExperimentConfig.from_run_config({'strategy.name': 'hetlora', "
        "'adapter.rank': 8, 'federation.client_ranks': '2,8', "
        "'privacy.mode': 'dp', 'privacy.epsilon': 1.0})\n"
        "heavy = ('torch', 'flwr', 'transformers', 'peft', 'opacus', 'datasets')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
