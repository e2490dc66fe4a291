"""The package's layers (ARCHITECTURE.md): imports only go down, and there is no cycle. Read from the source with
ast, so the test needs nothing installed; checked to fail on a graph with an upward arrow and on one with a cycle."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pystream"
# Bottom to top. `_files` is below every layer; `pystream/__init__.py` is the public facade over all of them (it
# imports lazily, by name) and is left out.
LAYERS = ["_files", "inputs", "cache", "measure", "results", "report", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """pystream modules `path` imports (at any depth in the file, lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pystream"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pystream":
                continue
            # `from . import clocks` names a module; `from .x import y` names x
            found |= {f"{target}.{a.name}" for a in node.names} if not node.module else {target}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path):
            while target not in modules and "." in target:  # `from .clocks import x` -> the module clocks
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_arrows(graph) -> list[tuple[str, str]]:
    bad = []
    for source, targets in graph.items():
        if layer_of(source) is None:
            continue
        for target in targets:
            if layer_of(target) is None:
                if layer_of(source) != "cli":  # the facade sits beside the top: only the CLI may import it
                    bad.append((source, target))
            elif LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(source)):
                bad.append((source, target))
    return bad


def cycles(graph) -> list[list[str]]:
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


def test_every_module_is_in_a_layer():
    assert [m for m in import_graph() if m != "pystream" and layer_of(m) is None] == []


def test_imports_only_go_down():
    assert upward_arrows(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_can_fail():
    graph = import_graph()
    graph["pystream.cache.kv"] = graph["pystream.cache.kv"] | {"pystream.results.schema"}
    assert ("pystream.cache.kv", "pystream.results.schema") in upward_arrows(graph)
    graph = {"pystream.cache.a": {"pystream.cache.b"}, "pystream.cache.b": {"pystream.cache.a"}}
    assert cycles(graph)
    assert imports_of(PACKAGE / "measure" / "runner.py") >= {"pystream.measure.clocks", "pystream.measure.cells"}


INTERNALS = [r"[.\"]_attn_implementation\b", r"\bCacheLayerMixin\b", r"\bROPE_INIT_FUNCTIONS\b",
             r"\bmodeling_rope_utils\b", r"\bcache\.layers\b", r"\bDynamicCache\(", r"\bAttentionInterface\b"]


def users_of(pattern: str) -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py") if re.search(pattern, p.read_text(encoding="utf-8")))


@pytest.mark.parametrize("internal", INTERNALS)
def test_only_the_adapter_touches_transformers_internals(internal):
    """transformers' cache and attention internals are read in the adapter (pystream/cache/hf.py) alone, and in the
    module reserved for the chunked attention kernel's registration, beside it."""
    allowed = {"pystream.cache.hf", "pystream.cache.chunked_attention"}
    assert [u for u in users_of(internal) if u not in allowed] == []


def test_the_internals_check_can_fail():
    assert "pystream.cache.hf" in users_of(INTERNALS[0]) and "pystream.cache.hf" in users_of(INTERNALS[4])


def test_results_and_report_import_no_engine():
    """The report reads results alone; results read nothing of the layers below but the paper's reference data."""
    graph = import_graph()
    for source, targets in graph.items():
        if layer_of(source) in ("results", "report"):
            assert {layer_of(t) for t in targets} <= {layer_of(source), "results", "_files", "inputs"}, \
                (source, targets)
            assert all(t in ("pystream.inputs.paper", "pystream.inputs") or layer_of(t) != "inputs"
                       for t in targets), (source, targets)
