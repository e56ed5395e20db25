"""Which module may import which: the table in docs/architecture.md ("Import rules"), checked against
every import statement of server/ and clients/python (read with ast, lazy imports included), so a new
circle, or the domain reaching for gRPC or Prometheus, fails here."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

SOURCES = {ROOT / "server": ("wafer", "wafer_proto"), ROOT / "clients" / "python": ("wafer_client",)}
OURS = ("wafer", "wafer_proto", "wafer_client")
# Third-party packages that only some parts may import.
GRPC = ("grpc", "grpc_health", "grpc_reflection")
EDGES_OF_GRPC = ("wafer.rpc", "wafer.http", "wafer_client", "wafer_proto")
RESTRICTED = {name: EDGES_OF_GRPC for name in GRPC} | {"prometheus_client": ("wafer.metrics",)}
# The parts that record metrics run without Prometheus: they import neither it nor wafer.metrics.
WITHOUT_PROMETHEUS = ("wafer.cache", "wafer.engine", "wafer.indexing", "wafer.jobs", "wafer.scheduler")
# The parts that use models reach one only through the handle a lease gives (ModelHandle, whose work
# runs on the model's thread), never its backend or scheduler: only the model's thread may call a
# backend. A spec's `backend` is the backend's name, a string, and stays allowed.
MODEL_USERS = ("wafer.engine", "wafer.indexing", "wafer.jobs", "wafer.http", "wafer.rpc")
MODEL_INSIDES = frozenset({"backend", "_backend", "scheduler", "_scheduler", "instances"})
INSIDE_TYPES = frozenset({"Backend", "ModelScheduler", "LoadedModel"})


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. wafer.rpc.server
    target: str  # the imported module, e.g. wafer.engine, or a third-party name
    line: int


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base, packages in SOURCES.items():
        for package in packages:
            for path in sorted((base / package).rglob("*.py")):
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def imports(known: dict[str, Path]) -> Iterator[Import]:
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, _resolve(alias.name, known), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    # `from package import submodule` imports the submodule.
                    submodule = f"{base}.{alias.name}"
                    yield Import(module, submodule if submodule in known else _resolve(base, known), node.lineno)


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The module a dotted name lives in (an attribute's module), or the name itself if not ours."""
    if name.split(".", maxsplit=1)[0] not in OURS:
        return name
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def part(module: str) -> str:
    """The row of the table a module belongs to: wafer.<top-level module or package>, or the package."""
    top = module.split(".")
    if top[0] != "wafer":
        return top[0]
    return ".".join(top[:2]) if len(top) > 1 else "wafer"


def model_insides(module: str, source: str) -> Iterator[str]:
    """Where `source` reaches past a model handle: an attribute named like a backend, scheduler or
    instance list (other than a spec's backend name), or an import of their types."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in MODEL_INSIDES and not _is_spec(node.value):
            yield f"{module}:{node.lineno} reaches .{node.attr}"
        elif isinstance(node, ast.ImportFrom):
            yield from (f"{module}:{node.lineno} imports {a.name}" for a in node.names if a.name in INSIDE_TYPES)


def _is_spec(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.endswith("spec")


def documented_rules() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## Import rules") :]
    section = section[: section.index("\n## ", 1)]
    rules: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `([\w.]+)` \|([^|\n]*)\|$", section, re.MULTILINE):
        name, allowed = row
        assert name not in rules, f"the import table names {name} twice"
        rules[name] = set(re.findall(r"`([\w.]+)`", allowed))
    return rules


KNOWN = modules()
IMPORTS = list(imports(KNOWN))
RULES = documented_rules()


def test_every_part_has_a_row_and_every_row_a_part() -> None:
    parts = {part(module) for module in KNOWN} - {"wafer"}  # the package's __init__ imports nothing
    assert parts == set(RULES), f"rows missing: {parts - set(RULES)}; rows for nothing: {set(RULES) - parts}"
    assert all(allowed <= set(RULES) for allowed in RULES.values())


def test_the_documented_rules_have_no_cycle() -> None:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in RULES[start])

    circular = [name for name in RULES if reaches(name, name, {name})]
    assert not circular, f"the import table allows a circle through {circular}"


def test_every_import_is_allowed() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.target in KNOWN
        and part(i.target) != part(i.module)
        and part(i.target) != "wafer"  # `import wafer.x` also names the package, whose __init__ is empty
        and part(i.target) not in RULES[part(i.module)]
    ]
    assert not refused, "imports the table in docs/architecture.md does not allow:\n" + "\n".join(refused)


def test_no_module_imports_itself_back() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        if i.target in KNOWN and i.target != i.module:
            graph[i.module].add(i.target)
    # `import a.b.c` runs a and a.b first; a package's __init__ importing its own modules is the usual
    # re-export, so a package's edges to its parents are not cycles.
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if module.startswith(target + "."):
                continue
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif len(cycles) < 5 and target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_grpc_and_prometheus_stay_where_they_belong() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if (allowed := RESTRICTED.get(i.target.split(".")[0])) is not None
        and not any(i.module == a or i.module.startswith(a + ".") for a in allowed)
    ]
    assert not refused, "\n".join(refused)


def test_the_parts_that_record_metrics_run_without_prometheus() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if part(i.module) in WITHOUT_PROMETHEUS and (i.target == "wafer.metrics" or i.target.startswith("prometheus"))
    ]
    assert not refused, "\n".join(refused)


def test_server_and_client_do_not_import_each_other() -> None:
    server = [i for i in IMPORTS if i.module.startswith("wafer.") and i.target.startswith("wafer_client")]
    client = [i for i in IMPORTS if i.module.startswith("wafer_client") and part(i.target) == "wafer"]
    client += [i for i in IMPORTS if i.module.startswith("wafer_client") and i.target.startswith("wafer.")]
    assert not server and not client, [*server, *client]


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The rules are not vacuous: the domain importing an edge is caught, lazy imports included."""
    fake = {"wafer.engine": tmp_path / "engine.py", "wafer.rpc.server": tmp_path / "server.py"}
    fake["wafer.engine"].write_text("def f() -> None:\n    from wafer.rpc.server import create_server\n")
    fake["wafer.rpc.server"].write_text("")
    (found,) = [i for i in imports(fake) if i.module == "wafer.engine"]
    assert found.target == "wafer.rpc.server"
    assert part(found.target) not in RULES[part(found.module)]


def test_model_users_reach_models_only_through_a_handle() -> None:
    users = [m for m in KNOWN if any(m == u or m.startswith(u + ".") for u in MODEL_USERS)]
    assert "wafer.engine" in users and "wafer.rpc.servicers" in users
    refused = [line for m in users for line in model_insides(m, KNOWN[m].read_text(encoding="utf-8"))]
    assert not refused, "reaches past the model handle (use its methods):\n" + "\n".join(refused)


def test_the_handle_check_sees_a_backend() -> None:
    """The check is not vacuous: the engine's old ways to a backend are caught, a spec's name is not."""
    old = (
        "from wafer.backends.base import Backend\n"
        "async def f(model, spec, texts):\n"
        "    kind = spec.backend, model.spec.backend\n"
        "    if model.backend.contextual:\n"
        "        await model.scheduler.run(lambda: split(model.backend, texts))\n"
    )
    assert sorted(model_insides("wafer.engine", old)) == [
        "wafer.engine:1 imports Backend",
        "wafer.engine:4 reaches .backend",
        "wafer.engine:5 reaches .backend",
        "wafer.engine:5 reaches .scheduler",
    ]
