"""Rules for the test suite itself: shared helpers live in helper modules, never in test modules.

A helper imported from another test module drags that module's fixtures and
constants along, runs its import-time code twice under two names, and hides
which helpers are shared. Shared code goes into ``tests/helpers.py``,
``tests/proxy_fixtures.py`` and their siblings instead. A shared helper that
many assertions read through (``sample``) is checked here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy.metrics import Metrics
from tests.helpers import sample

TESTS = Path(__file__).resolve().parent


def is_test_module(dotted: str) -> bool:
    """Whether a module name (``tests.test_x``, ``.test_x``, a bare ``test_x``) is one of our test modules.

    Third-party modules that happen to be named so (``aiohttp.test_utils``) are not ours.
    """
    package, _, name = dotted.rpartition(".")
    ours = package in ("", "tests") or package.startswith(("tests.", "."))
    return ours and name.startswith("test_")


def imported_test_modules(source: str) -> list[str]:
    """The test modules ``source`` imports, at any depth (module level or inside a function)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if is_test_module(module):
                found.append(module)
            else:  # ``from tests import test_x``
                found += [f"{module}.{a.name}" for a in node.names if is_test_module(a.name)]
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from tests.test_metrics import scrape",
        "import tests.test_metrics",
        "import tests.test_metrics as m",
        "from tests import test_metrics",
        "from .test_metrics import scrape",
        "def f():\n    from tests.test_shutdown import launch_proxy\n",
        "import test_metrics",
        "from tests.bench.test_x import y",
    ],
)
def test_the_rule_sees_every_form_of_importing_a_test_module(source: str) -> None:
    assert imported_test_modules(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "from tests.helpers import eventually",
        "from tests import helpers",
        "import tests.proxy_fixtures",
        "from aiohttp.test_utils import TestServer",
    ],
)
def test_the_rule_lets_helper_modules_be_imported(source: str) -> None:
    assert imported_test_modules(source) == []


def test_no_module_of_the_suite_imports_a_test_module() -> None:
    sources = sorted(TESTS.rglob("*.py"))
    assert len(sources) > 40  # the whole suite was read, helpers and benchmarks included
    offenders = {
        str(path.relative_to(TESTS)): found
        for path in sources
        if (found := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move shared helpers into tests/helpers.py (or a fixtures module)"


def test_sample_reads_counters_and_gauges_and_refuses_a_name_no_family_exposes() -> None:
    metrics = Metrics()
    metrics.redis_errors.labels("get").inc(2)
    metrics.in_flight.set(3)
    assert sample(metrics, "ccp_redis_errors_total", op="get") == 2
    assert sample(metrics, "ccp_redis_errors_total", op="set") == 0  # a series never touched
    assert sample(metrics, "ccp_in_flight_requests") == 3
    for misspelt in ("ccp_redis_errors", "ccp_in_flight_requests_total", "ccp_redis_error_total"):
        with pytest.raises(AssertionError, match="no metric family"):
            sample(metrics, misspelt, op="get")
