"""The shape of the package: the folders are the layers, imports flow one
way between them and have no cycles (counting imports inside functions), and
loading a model imports nothing above the runtime library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package names they install as (pyproject.toml).
PACKAGES = {"mlx_kvq": "mlx_kvq", "metal_kernels": "mlx_kvq.metal_kernels",
            "cpu_kernels": "mlx_kvq.cpu_kernels",
            "mlx_kvq/commands": "mlx_kvq.commands", "converters": "mlx_kvq.converters",
            "apps": "mlx_kvq.apps", "apps/assistant": "mlx_kvq.apps.assistant",
            "mlx_kvq/harness": "mlx_kvq.harness"}
# The layers, lowest first: a module imports from its own layer or below.
# The runtime library is what `import mlx_kvq` and an mlx-lm script need.
LAYERS = (("library", ("mlx_kvq", "mlx_kvq.metal_kernels", "mlx_kvq.cpu_kernels")),
          ("commands", ("mlx_kvq.commands",)),
          ("converters", ("mlx_kvq.converters",)),
          ("apps", ("mlx_kvq.apps",)),
          ("harness", ("mlx_kvq.harness",)))


def _modules() -> dict:
    """{module name: path} of every module of the package."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """Package modules `name` imports, anywhere in its file."""
    is_package = path.stem == "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            # `from pkg import mod` imports the module; `from mod import name`, mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not (is_package and name.startswith(t)):
                out.add(t)
    return out


def import_graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_and_finds_cycles():
    graph = import_graph()
    assert "mlx_kvq.cache" in graph["mlx_kvq.attention"]
    assert "mlx_kvq.kvplan" in graph["mlx_kvq.converters.calibrate"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def layer_of(module: str) -> int:
    """The index in LAYERS of the folder a module lives in."""
    best = None
    for i, (_, packages) in enumerate(LAYERS):
        for p in packages:
            if (module == p or module.startswith(p + ".")) and (
                    best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{module} is in no layer"
    return best[0]


ABOVE_LIBRARY = tuple(p for _, packages in LAYERS[1:] for p in packages)


def upward_imports(graph: dict) -> list:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets
                  if layer_of(t) > layer_of(m))


def test_every_module_is_in_a_layer_and_imports_flow_down():
    graph = import_graph()
    assert len(graph) > 40 and {layer_of(m) for m in graph} == set(range(len(LAYERS)))
    assert upward_imports(graph) == []
    # the rule sees a violation
    broken = dict(graph, **{"mlx_kvq.cache": graph["mlx_kvq.cache"] | {"mlx_kvq.harness.fuzz"}})
    assert upward_imports(broken) == [
        "mlx_kvq.cache (library) imports mlx_kvq.harness.fuzz (harness)"]


def test_loading_a_model_imports_no_tool():
    from mlx_kvq.models import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the default model is not converted (setup.sh converts it)")
    code = ("import sys, mlx_kvq; mlx_kvq.load(); "
            "print(sorted(m for m in sys.modules if m.startswith(%r)))" % (ABOVE_LIBRARY,))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_kernel_supports_what_specs_allow():
    """The kernel's host code depends on MLX alone, so it states what the
    Metal kernel implements itself; that must stay within what a spec can ask
    for."""
    from mlx_kvq.metal_kernels import decode as kernels
    from mlx_kvq import spec

    assert set(kernels.SUPPORTED_BITS) <= set(spec.VALID_BITS) - {16}
    assert set(kernels.SUPPORTED_GROUP_SIZES) <= set(spec.VALID_GROUPS)
    graph = import_graph()
    assert not [m for m in graph["mlx_kvq.metal_kernels.decode"]
                if m != "mlx_kvq.metal_kernels.emulator"]
