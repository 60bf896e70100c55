"""The tree shows the architecture: no import cycles inside rdkv_hf, nothing imported from the
package face by its own modules, no private attribute read across modules by string, the library
a user imports kept apart from the evaluation harness, and a registry entry for every mode."""

import ast
from pathlib import Path

import rdkv_hf

PACKAGE = Path(rdkv_hf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of rdkv_hf that `path` imports, at any level (function bodies included), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rdkv_hf"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("rdkv_hf"):
                continue
            for alias in node.names:  # `from . import quant` imports the module rdkv_hf.quant
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists() else target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(path):
            while target not in modules and "." in target:  # a name inside a module
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_inside_rdkv_hf():
    graph = import_graph()
    assert len(graph) > 30 and "rdkv_hf.cache" in graph["rdkv_hf.attention"]  # the graph is read at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_do_not_import_the_package_face_and_the_library_not_the_harness():
    graph = import_graph()
    for name, edges in graph.items():
        if name in ("rdkv_hf", "rdkv_hf.__main__"):
            continue
        assert "rdkv_hf" not in edges, f"{name} imports the package face (rdkv_hf/__init__.py)"
        if not name.startswith(("rdkv_hf.eval", "rdkv_hf.cli", "rdkv_hf.__main__")):
            harness = sorted(e for e in edges if e.startswith("rdkv_hf.eval"))
            assert not harness, f"{name} (library) imports the evaluation harness {harness}"


def test_no_private_attribute_is_read_by_string_across_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr", "delattr"):
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                    attr = node.args[1].value
                    if attr.startswith("_rdkv") or attr == "_rdkv_state":
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {attr}")
    assert not offenders, offenders


def test_no_module_shares_its_name_with_a_folder_or_a_public_function():
    for path in PACKAGE.rglob("*.py"):
        assert not (path.parent / path.stem).is_dir() or path.name == "__init__.py", f"{path} beside folder {path.stem}/"
    for name in rdkv_hf.__all__:
        assert not (PACKAGE / f"{name}.py").exists(), f"rdkv_hf.{name} is both a module and a name of the package face"
