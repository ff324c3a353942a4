"""The shape of the package, read from its source (issue 13): no import cycle
among our modules, declarations a leaf, netns.py the only one that enters a
namespace, and the tuners leaving Tuner's final methods alone.

Everything is one parse of src/pybpftune (well under a second); no module is
imported.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "pybpftune"


@dataclass(frozen=True)
class Import:
    """One import of one of our modules: where, and when it runs."""

    source: str
    target: str
    line: int
    kind: str  # "module" (at import time), "lazy" (inside a function) or "typing" (under TYPE_CHECKING)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@functools.cache
def modules() -> dict[str, Module]:
    out: dict[str, Module] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        out[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: Module, node: ast.Import | ast.ImportFrom, known: dict[str, Module]) -> Iterator[str]:
    """Our modules an import statement loads (a name imported from a package
    counts as its submodule when there is one, else as the package)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
        return
    if node.level:
        base = module.name.split(".")
        keep = len(base) - node.level + (1 if module.is_package else 0)
        parent = ".".join(base[:keep] + ([node.module] if node.module else []))
    else:
        parent = node.module or ""
    for alias in node.names:
        sub = f"{parent}.{alias.name}"
        if sub in known:
            yield sub
        elif parent in known:
            yield parent


def _dynamic_targets(call: ast.Call, known: dict[str, Module]) -> Iterator[str]:
    """importlib.import_module("pybpftune.x") or f"pybpftune.tuners.{name}":
    every module the literal part can name (registry loads the tuners so)."""
    func = call.func
    if not (isinstance(func, ast.Attribute | ast.Name) and _name(func) == "import_module") or not call.args:
        return
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        if arg.value in known:
            yield arg.value
    elif isinstance(arg, ast.JoinedStr) and arg.values:
        head = arg.values[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.startswith(PACKAGE + "."):
            yield from (name for name in known if name.startswith(head.value))


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import of our modules: at module level, under TYPE_CHECKING and
    inside functions."""
    known = modules()
    out: list[Import] = []
    for module in known.values():

        def visit(node: ast.AST, kind: str, module: Module = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for stmt in child.body:
                        visit_one(stmt, "typing")
                    for stmt in child.orelse:
                        visit_one(stmt, kind)
                    continue
                visit_one(child, kind)

        def visit_one(node: ast.AST, kind: str, module: Module = module) -> None:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.extend(Import(module.name, t, node.lineno, kind) for t in _targets(module, node, known))
                return
            if isinstance(node, ast.Call):
                out.extend(Import(module.name, t, node.lineno, kind) for t in _dynamic_targets(node, known))
            inner = "lazy" if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else kind
            visit(node, "typing" if kind == "typing" else inner)

        visit(module.tree, "module")
    return tuple(out)


def _find_cycle(edges: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One cycle of the graph as the imports that make it, or None."""
    state: dict[str, int] = {}  # 1: on the DFS path, 2: done
    path: list[Import] = []

    def dfs(node: str) -> list[Import] | None:
        state[node] = 1
        for target, imp in sorted(edges.get(node, {}).items()):
            if state.get(target) == 1:
                start = next((i for i, step in enumerate(path) if step.source == target), len(path))
                return [*path[start:], imp]
            if target not in state:
                path.append(imp)
                found = dfs(target)
                if found is not None:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = dfs(node)
            if found is not None:
                return found
    return None


def test_no_import_cycle_among_our_modules() -> None:
    """Counting every import, lazy and type-only ones too: a cycle hidden in
    a function or under TYPE_CHECKING is still two modules that cannot be
    understood (or moved) one without the other."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports():
        if imp.source != imp.target:
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle:\n" + "\n".join(
        f"  {i.source} -> {i.target}  ({modules()[i.source].path.relative_to(SRC)}:{i.line}, {i.kind})" for i in cycle
    )


def test_the_walk_sees_every_kind_of_import() -> None:
    """The test above is only as good as the walk: it finds known imports of each kind."""
    seen = {(i.source, i.target, i.kind) for i in imports()}
    assert ("pybpftune.serve", "pybpftune.daemon", "module") in seen
    assert ("pybpftune.serve", "pybpftune.metrics", "lazy") in seen
    assert ("pybpftune.metrics", "pybpftune.daemon", "typing") in seen
    assert ("pybpftune.console", "pybpftune.cli", "lazy") in seen
    assert ("pybpftune.registry", "pybpftune.tuners.sysctl", "lazy") in seen  # importlib.import_module
    assert _find_cycle({"a": {"b": Import("a", "b", 1, "lazy")}, "b": {"a": Import("b", "a", 2, "typing")}})


def test_declarations_imports_nothing_of_ours_at_run_time() -> None:
    """Tuners and the store both read the declarations: they must stay a leaf
    (type-only imports are free)."""
    ours = [i for i in imports() if i.source == f"{PACKAGE}.declarations" and i.kind != "typing"]
    assert not ours, [f"line {i.line}: {i.target} ({i.kind})" for i in ours]


# A namespace file: /proc/<pid>/ns/net, /proc/self/ns/mnt, ...
NS_PATH = re.compile(r"/ns(/|$)")
# What may not be done with such a path outside netns.py: open it, stat it, enter it.
OPENERS = frozenset({"open", "stat", "lstat", "Path", "PurePath"})


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _ns_path_misuse(module: Module) -> Iterator[str]:
    parents = _parents(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and _name(node.func).lstrip("_") == "setns":
            yield f"line {node.lineno}: calls {ast.unparse(node.func)}"
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and NS_PATH.search(node.value)):
            continue
        expr: ast.AST = node
        if isinstance(parents.get(expr), ast.JoinedStr):
            expr = parents[expr]
        if isinstance(parents.get(expr), ast.Expr):
            continue  # a docstring or a bare comment string
        # Passing the path on (to netns.Namespaces, which does the entering) is
        # fine, directly or as one branch of a conditional; anything else is not.
        while isinstance(parents.get(expr), ast.IfExp):
            expr = parents[expr]
        call = parents.get(expr)
        if not isinstance(call, ast.Call) or expr is call.func:
            yield f"line {node.lineno}: a namespace path not handed to a call: {ast.unparse(parents.get(expr, expr))}"
        elif _name(call.func) in OPENERS:
            yield f"line {node.lineno}: {ast.unparse(call)}"


def test_only_netns_enters_or_opens_namespaces() -> None:
    """netns.py alone calls setns and opens /proc/<pid>/ns/*: a module that
    entered a namespace itself could leave its thread there.  Others may build
    such a path to hand to netns.Namespaces (the sysctl and netns tuners do)."""
    bad = {
        name: found
        for name, module in modules().items()
        if name != f"{PACKAGE}.netns" and (found := list(_ns_path_misuse(module)))
    }
    assert not bad, bad


def test_the_namespace_check_sees_misuse() -> None:
    code = (
        "import os\n"
        "def f(pid, libc):\n"
        "    fd = os.open(f'/proc/{pid}/ns/net', os.O_RDONLY)\n"
        "    libc.setns(fd, 0)\n"
        "    p = '/proc/self/ns/net'\n"
        "    ns.add(f'/proc/{pid}/ns/net' if pid else None)\n"
    )
    found = list(_ns_path_misuse(Module("m", Path("m.py"), ast.parse(code))))
    assert sorted(f.split(":")[0] for f in found) == ["line 3", "line 4", "line 5"], found


FINAL = frozenset({"handle_event", "apply"})


def test_tuners_do_not_override_the_final_methods() -> None:
    """Tuner.handle_event and Tuner.apply are the one pipeline every decision
    goes through; a tuner says what to do in decide()."""
    bad: list[str] = []
    for name, module in modules().items():
        if not name.startswith(f"{PACKAGE}.tuners."):
            continue
        for node in ast.walk(module.tree):
            defined: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            bad.extend(f"{name}:{getattr(node, 'lineno', 0)} defines {d}" for d in defined if d in FINAL)
    assert not bad, bad
    assert "pybpftune.tuners.sysctl" in modules()  # the walk reached the tuners


def _header_names() -> set[str]:
    """Every id the shared header defines, as C names and as the bindings'
    short member names ("TCP_BUFFER_TCP_WMEM", "TCP_WMEM")."""
    import enum

    from pybpftune import bindings, libbpf

    names: set[str] = set()
    for value in vars(bindings).values():
        if isinstance(value, type) and issubclass(value, enum.Enum):
            names.update(m.name for m in value)
    for match in re.finditer(r"^enum (\w+)", (SRC.parent / "src/bpf/bpftune_shared.h").read_text(), re.M):
        names.update(libbpf.enum_members(f"enum {match.group(1)}"))
    return names


def _literal_copies(module: Module, names: set[str]) -> Iterator[str]:
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and type(node.value.value) is int:
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in names:
                    yield f"{module.name}:{node.lineno} {target.id} = {node.value.value}"
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            # A, B = 0, 1
            elts = node.value.elts
            if all(isinstance(e, ast.Constant) and type(e.value) is int for e in elts):
                for target in node.targets:
                    if isinstance(target, ast.Tuple):
                        hits = [t.id for t in target.elts if isinstance(t, ast.Name) and t.id in names]
                        if hits:
                            yield f"{module.name}:{node.lineno} {', '.join(hits)} = literals"


def test_no_header_id_is_copied_as_a_literal() -> None:
    """Ids come from pybpftune.bindings (read from the compiled header), never
    from an integer written again in Python."""
    names = _header_names()
    assert {"TCP_WMEM", "TCP_BUFFER_TCP_WMEM", "IPV6_MAX_SIZE", "OBS_NEAR_THRESH"} <= names
    copies = [c for name, m in modules().items() if name != f"{PACKAGE}.bindings" for c in _literal_copies(m, names)]
    assert not copies, copies


def test_the_copy_check_sees_a_copy() -> None:
    tree = ast.parse("MAX_SIZE = 0\nCREATE, DESTROY = 0, 1\nFORGET_S = 30\n")
    found = list(_literal_copies(Module("x", Path("x.py"), tree), {"MAX_SIZE", "CREATE", "DESTROY"}))
    assert found == ["x:1 MAX_SIZE = 0", "x:2 CREATE, DESTROY = literals"]
