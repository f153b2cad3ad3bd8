"""Import boundaries of the package, checked in fresh interpreters and from the source.

- The emulator stands in for Credicorp: it may use the product's scope
  catalogue (``proxy.scopes``) and nothing else of it, so it can never agree
  with the proxy by sharing the proxy's code.
- ``credicorp-proxy run`` and ``healthcheck`` load no emulator module; the
  healthcheck (the image's HEALTHCHECK, every few seconds in every container)
  loads no aiohttp, Redis client or Prometheus client either.
- No ``proxy.*`` module imports, at import time, a module that imports it
  back: a cycle works only until someone reorders two imports.
"""

from __future__ import annotations

import ast
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

from proxy.emulator.app import EmulatorServer
from tests.proxy_fixtures import StartProxy, base_config, merge
from tests.redis_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"

# ------------------------------------------------------------ the emulator's side

#: Imports each module under proxy/emulator in turn and prints, for every module that got
#: loaded, the emulator module whose import loaded it first. ``__main__`` is left out: importing
#: it runs the emulator.
_WALK_EMULATOR = """
import importlib, json, pkgutil, sys
loaded_by = {}
def load(name):
    before = set(sys.modules)
    importlib.import_module(name)
    for new in set(sys.modules) - before:
        loaded_by.setdefault(new, name)
load("proxy.emulator")
import proxy.emulator
walked = ["proxy.emulator"]
for info in pkgutil.walk_packages(proxy.emulator.__path__, "proxy.emulator."):
    if info.name.rsplit(".", 1)[-1] != "__main__":
        walked.append(info.name)
        load(info.name)
print(json.dumps({"walked": walked, "loaded_by": loaded_by}))
"""

#: What the emulator may load of the product: the package itself and the scope catalogue.
EMULATOR_MAY_USE = {"proxy", "proxy.scopes"}


def _product_module(name: str) -> bool:
    return (name == "proxy" or name.startswith("proxy.")) and not _emulator_module(name)


def _emulator_module(name: str) -> bool:
    return name == "proxy.emulator" or name.startswith("proxy.emulator.")


def test_the_emulator_uses_nothing_of_the_product_but_the_scope_catalogue() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WALK_EMULATOR],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"proxy.emulator.app", "proxy.emulator.cli", "proxy.emulator.testing"} <= set(report["walked"])
    leaks = {
        name: by
        for name, by in report["loaded_by"].items()
        if _product_module(name) and name not in EMULATOR_MAY_USE
    }
    assert not leaks, "emulator modules load product modules (module: loaded first by): " + ", ".join(
        f"{name}: {by}" for name, by in sorted(leaks.items())
    )


# ------------------------------------------------------------- the product's side

#: Runs ``credicorp-proxy ARGS...`` through ``proxy.cli.main`` and, at interpreter exit, writes
#: every module that was ever loaded to the file named by the first argument.
_RUN_MAIN = """
import atexit, json, sys
out = sys.argv[1]
def record():
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(record)
from proxy.cli import main
sys.exit(main(sys.argv[2:]))
"""

#: Packages the healthcheck must not load: it only reads the config and does one GET.
HEALTHCHECK_MUST_NOT_LOAD = ("aiohttp", "redis", "prometheus_client", "uvloop")


def _main_argv(record: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", _RUN_MAIN, str(record), *args]


def _loaded(record: Path) -> set[str]:
    return set(json.loads(record.read_text()))


async def _wait_ready(url: str, proc: asyncio.subprocess.Process, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the proxy exited before it was ready"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


async def test_run_loads_no_emulator_module(emulator: EmulatorServer, tmp_path: Path) -> None:
    """The whole life of a real ``run``: start, serve a request, drain on SIGTERM, exit."""
    port, admin = free_port(), free_port()
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            merge(
                base_config(emulator.url),
                {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}"},
            )
        )
    )
    record = tmp_path / "modules.json"
    proc = await asyncio.create_subprocess_exec(
        *_main_argv(record, "run", "-c", str(config)),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/partner/v1/decisions/dec_demo_001") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    loaded = _loaded(record)
    assert {"proxy.app", "proxy.forward", "proxy.tokens.manager"} <= loaded  # it did run the proxy
    emulator_modules = sorted(filter(_emulator_module, loaded))
    assert not emulator_modules, f"run loaded emulator modules: {emulator_modules}"


async def test_healthcheck_loads_no_emulator_no_server_no_redis_no_metrics(
    start_proxy: StartProxy, emulator: EmulatorServer, tmp_path: Path
) -> None:
    admin_listen = f"127.0.0.1:{free_port()}"
    await start_proxy({"admin_listen": admin_listen})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(merge(base_config(emulator.url), {"admin_listen": admin_listen})))
    record = tmp_path / "modules.json"
    proc = await asyncio.create_subprocess_exec(
        *_main_argv(record, "healthcheck", "-c", str(config)), cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()  # it reached /healthz and got its 200
    loaded = _loaded(record)
    assert {"proxy.config", "http.client"} <= loaded
    emulator_modules = sorted(filter(_emulator_module, loaded))
    assert not emulator_modules, f"healthcheck loaded emulator modules: {emulator_modules}"
    server_side = sorted(name for name in loaded if name.split(".")[0] in HEALTHCHECK_MUST_NOT_LOAD)
    assert not server_side, f"healthcheck loaded {server_side}"


# ------------------------------------------------------------- import cycles


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: not in functions, not under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_statements(node.orelse)
        else:
            for nested in _nested_bodies(node):
                yield from _import_time_statements(nested)


def _nested_bodies(node: ast.stmt) -> list[list[ast.stmt]]:
    """The statement lists inside ``node`` that run with it (class bodies, try, with, if, loops)."""
    if isinstance(node, ast.Try | ast.TryStar):
        return [node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody]
    if isinstance(node, ast.Match):
        return [case.body for case in node.cases]
    return [
        block
        for block in (getattr(node, "body", None), getattr(node, "orelse", None))
        if isinstance(block, list)
    ]


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules this statement makes Python import: the named ones, and the packages
    they live in unless that package is the importer's own (already being imported)."""
    if isinstance(node, ast.Import):
        named = {alias.name for alias in node.names}
        loaded = set(named)
    else:
        base = _absolute_base(node, module, is_package)
        submodules = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
        takes_names = len(submodules) < len(node.names)  # a name defined in base itself (or *)
        named = submodules | ({base} if takes_names else set())
        loaded = submodules | {base}
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    implied = {".".join(name.split(".")[:i]) for name in loaded for i in range(1, name.count(".") + 2)}
    return (named | (implied - own)) & known - {module}


def _absolute_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    here = module.split(".") if is_package else module.split(".")[:-1]
    anchor = here[: len(here) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at import time, parsed from the source under ``root``."""
    files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = set().union(
            *(_resolve(node, module, is_package, known) for node in _import_time_statements(tree.body))
        )
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> a``) per strongly connected group of modules, shortest first."""
    cycles = []
    for group in _strongly_connected(graph):
        start = min(group)
        cycles.append(_shortest_path_back(graph, start, group))
    return sorted(cycles, key=lambda c: (len(c), c))


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; only the groups of two or more modules (self-imports are dropped above)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _shortest_path_back(graph: dict[str, set[str]], start: str, group: set[str]) -> list[str]:
    paths = {start: [start]}
    queue = [start]
    for node in queue:
        for target in sorted(graph[node] & group):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"{start} is in a cycle group but no path leads back to it")


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert {"proxy.cli", "proxy.emulator.app", "proxy.tokens.manager"} <= set(graph)
    assert "proxy.forward" in graph["proxy.app"] and "proxy.errors" in graph["proxy.cli"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_sees_a_cycle_and_only_runtime_imports(tmp_path: Path) -> None:
    """The finder itself: a real cycle is reported; function-level and TYPE_CHECKING imports,
    and a submodule importing a sibling through its own package, are not cycles."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "try:\n    import pkg.a\nexcept ImportError:\n    pass\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
        "d.py": "import pkg.c\n\ndef later():\n    from pkg import c\n",
        "e.py": "class E:\n    from . import f\n",
        "f.py": "from .sub import g\n",
        "sub/__init__.py": "from pkg.sub import g\n",
        "sub/g.py": "from . import h\nfrom .. import e\n",
        "sub/h.py": "",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub.g"] == {"pkg.sub.h", "pkg.e"}  # its own package is not an edge
    assert graph["pkg.f"] == {"pkg.sub", "pkg.sub.g"}  # another package's module loads that package
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert import_cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.e", "pkg.f", "pkg.sub.g", "pkg.e"],  # the shortest way round
    ]
