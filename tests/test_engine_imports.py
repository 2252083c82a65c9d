"""The engine's modules import one way: no module reaches back to one that imports it (the
spawned worker's entry point is handed to minivllm/engine/tp_processes.py, not imported by it), and the
model's layers see tensor parallelism's arithmetic only, never its processes or the API."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "minivllm" / "engine"


def engine_imports() -> dict[str, set[str]]:
    """{module: engine modules it imports anywhere in its body, function-level imports too}."""
    graph = {}
    for path in ENGINE.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minivllm.engine"):
                deps |= {f"minivllm.engine.{a.name}" for a in node.names} if node.module == "minivllm.engine" else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("minivllm.engine.")}
        graph[f"minivllm.engine.{path.stem}"] = deps - {f"minivllm.engine.{path.stem}"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(node):
        if node in path:
            return [*path[path.index(node):], node]
        if node in done or node not in graph:
            return None
        path.append(node)
        for dep in sorted(graph[node]):
            if cycle := visit(dep):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for n in sorted(graph) if (c := visit(n))), None)


def test_engine_import_graph_has_no_cycle():
    assert find_cycle(engine_imports()) is None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every engine module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_tensor_parallel_layers_import_downward_only():
    graph = engine_imports()
    assert reaches(graph, "minivllm.engine.tensor_parallel") == set()
    assert reaches(graph, "minivllm.engine.tp_processes") == {"minivllm.engine.tensor_parallel"}
    for layer in ("minivllm.engine.qwen3", "minivllm.engine.loader", "minivllm.engine.model_runner"):
        assert not reaches(graph, layer) & {"minivllm.engine.tp_processes", "minivllm.engine.llm"}, layer


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
