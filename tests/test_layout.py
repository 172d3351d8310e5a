"""The package's plan, kept by a test: each room imports only from rooms below it, and no
module imports itself back through another (function-level imports included).

    kernels  <  core  <  readers  <  reporting  <  layers | anomaly  <  tools

``layers`` and ``anomaly`` sit side by side and import nothing of each other. The package's
own ``__init__`` (lazy exports), ``__main__`` (python -m safe_layers) and the
``safe_layers.backend`` alias stand above all.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "safe_layers")

RANKS = {"kernels": 0, "core": 1, "readers": 2, "reporting": 3, "layers": 4, "anomaly": 4,
         "tools": 5}
FACADES = {"safe_layers", "safe_layers.backend", "safe_layers.__main__"}


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module, path):
    """The safe_layers modules ``module`` imports, anywhere in its body."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not path.endswith("__init__.py"):
                    base = base[:-1]
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from PKG import module`` imports the module; ``from MODULE import name``
            # the module itself.
            names = ["%s.%s" % (base, alias.name) if "%s.%s" % (base, alias.name) in MODULES
                     else base for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES and name != module:
                out.add(name)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_rooms_are_known():
    rooms = {_room(m) for m in MODULES if m not in FACADES}
    assert rooms <= set(RANKS), sorted(rooms - set(RANKS))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in FACADES))
def test_nothing_imports_upward(module):
    room = _room(module)
    upward = []
    for target in sorted(GRAPH[module]):
        other = _room(target)
        if target == "safe_layers":
            continue  # the root package (its __version__), imported before any of its modules
        if target in FACADES:
            upward.append(target)
        elif other != room and RANKS[other] >= RANKS[room]:
            upward.append(target)
    assert not upward, "%s (%s) imports %s" % (module, room, ", ".join(upward))


def test_no_module_imports_itself_back():
    # Tarjan's strongly connected components: any component of two or more is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, circles


# Sizes that read at a glance: a file over this many lines holds more than one concept, a
# function over this many lines more than one step; one that reads best whole says why in
# its docstring ("read best whole").
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_are_small_or_say_why(module):
    path = MODULES[module]
    text = open(path, encoding="utf-8").read()
    assert text.count("\n") <= MAX_FILE_LINES, "%s has %d lines" % (path, text.count("\n"))
    long = []
    for node in ast.walk(ast.parse(text, path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if length > MAX_FUNCTION_LINES and "read best whole" not in doc.replace("\n", " ") \
                    and "reads best whole" not in doc.replace("\n", " "):
                long.append("%s (%d lines)" % (node.name, length))
    assert not long, "%s: %s" % (path, ", ".join(long))
