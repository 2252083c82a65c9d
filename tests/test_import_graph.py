"""Who imports whom, read from the source (function-level imports too).

- minivllm never imports benchmarks, slurm or tests: the wheel ships minivllm alone.
- minivllm.kernels never imports minivllm.reference: the references stay independent of what
  they check.
- The engine's modules import one way: no module reaches back to one that imports it (the
  spawned worker's entry point is handed to minivllm/engine/tp_processes.py, not imported by
  it), and the model's layers see tensor parallelism's arithmetic only, never its processes or
  the API.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minivllm"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module `path` imports; `from a import b` counts a.b and a, since
    b may be a module or a name in a. Relative imports are resolved against the package."""
    name = module_name(path, root)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            deps |= {base} | {f"{base}.{a.name}" for a in node.names}
    return deps


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the modules it imports} for every module under `package`. Raises AssertionError
    on an empty or edgeless graph, so a walker that finds nothing cannot pass the tests below."""
    graph = {module_name(p, package.parent): imports_of(p, package.parent) for p in sorted(package.rglob("*.py"))}
    assert len(graph) > 20 and sum(len(d) for d in graph.values()) > 50, f"the import graph of {package} is empty: {graph}"
    return graph


def within(graph: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    """The subgraph of modules under `prefix`, with edges to modules under it only."""
    inside = {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    return {m: {d for d in graph[m] if d in inside and d != m} for m in inside}


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


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


def test_minivllm_imports_no_repo_tool_and_kernels_no_reference():
    graph = import_graph()
    tops = {m: {d.split(".")[0] for d in deps} for m, deps in graph.items()}
    assert {m: t & {"benchmarks", "slurm", "tests"} for m, t in tops.items() if t & {"benchmarks", "slurm", "tests"}} == {}
    assert "minivllm.kernels.flash_attention" in graph and "triton" in tops["minivllm.kernels.flash_attention"]
    kernels = {m: deps for m, deps in graph.items() if m.startswith("minivllm.kernels")}
    assert {m: {d for d in deps if d.startswith("minivllm.reference")} for m, deps in kernels.items()} == {m: set() for m in kernels}


def test_the_graph_walker_sees_what_a_module_imports(tmp_path):
    """The walker on a planted package: absolute, relative and function-level imports all show,
    and an empty package is refused rather than passing as 'imports nothing'."""
    pkg = tmp_path / "minivllm"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "bad.py").write_text("def f():\n    from ..reference import attention\n    import benchmarks.compare\n")
    assert imports_of(pkg / "kernels" / "bad.py", tmp_path) >= {"minivllm.reference", "minivllm.reference.attention", "benchmarks.compare"}
    try:
        import_graph(tmp_path / "empty")
    except AssertionError as e:
        assert "empty" in str(e)
    else:
        raise AssertionError("an empty graph passed")


def test_engine_import_graph_has_no_cycle():
    assert find_cycle(within(import_graph(), "minivllm.engine")) is None


def test_tensor_parallel_layers_import_downward_only():
    graph = within(import_graph(), "minivllm.engine")
    assert reaches(graph, "minivllm.engine.tensor_parallel") == set()
    assert reaches(graph, "minivllm.engine.tp_processes") == {"minivllm.engine.tensor_parallel"}
    for layer in ("minivllm.engine.qwen3", "minivllm.engine.loader", "minivllm.engine.model_runner"):
        assert not reaches(graph, layer) & {"minivllm.engine.tp_processes", "minivllm.engine.llm"}, layer


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
