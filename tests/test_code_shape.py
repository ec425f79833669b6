"""The shape rules the package keeps: short functions, imports one way.

Both are read from the source with ``ast``, so they hold for code no test
runs: a function over ``MAX_BODY_LINES`` or an import cycle (imports
inside functions and under ``TYPE_CHECKING`` included) fails here with
the names to look at.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "src" / "diskferry"

#: Lines of a function's body, its docstring left out, past which it
#: reads better split.
MAX_BODY_LINES = 50


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    end = body[-1].end_lineno
    assert end is not None
    return end - body[0].lineno + 1


def test_no_long_function() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = _body_lines(node)
                if lines > MAX_BODY_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}: {lines}")
    assert long == []


def _imported(module: str, path: pathlib.Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            # ``from package import module`` needs the module; a name
            # that is not a module comes from ``base`` itself.
            names = [f"{base}.{alias.name}"
                     if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle() -> None:
    graph = {name: _imported(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(graph: dict[str, set[str]],
                      expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_package_modules_are_found() -> None:
    assert "diskferry.daemon.http.server" in MODULES
    assert "diskferry.daemon.backends" in MODULES
    assert _imported("diskferry.cli.main", MODULES["diskferry.cli.main"])


def _source(module: str) -> str:
    return MODULES[module].read_text()


def test_http_core_names_no_route() -> None:
    """The HTTP core serves any application: routes and their labels come
    from the handlers."""
    for name in MODULES:
        if name.startswith("diskferry.daemon.http"):
            text = _source(name)
            assert "/images" not in text and "/tickets" not in text, name


def test_images_handler_speaks_http_only() -> None:
    """How bytes move between a connection and a backend is the data
    path's choice, not the images handler's."""
    text = _source("diskferry.daemon.handlers.images")
    for word in ("fileno", "sendfile", "splice"):
        assert word not in text
