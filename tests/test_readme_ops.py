"""deploy/README.md's Operations section lists exactly the metrics the code registers.

The metrics table under "## Operations" / "### Metrics" is parsed and compared
with a fresh ``proxy.metrics.Metrics()`` registry, walked the way Prometheus
sees it: a counter family ``x`` is exposed as ``x_total``, an Info ``x`` as
``x_info``. A metric added to the code but not to the table fails here, and
so does a documented metric the code no longer has, a wrong type or a wrong
label list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import Metrics

README = Path(__file__).resolve().parent.parent / "deploy" / "README.md"
_CODE = re.compile(r"`([^`]+)`")
_SUFFIX = {"counter": "_total", "info": "_info"}


@dataclass(frozen=True)
class Row:
    type: str
    labels: frozenset[str]


def section(text: str, heading: str, level: int) -> str:
    """The body of the first ``heading`` at ``level``, up to the next heading of that level or higher."""
    marks = "#" * level
    match = re.search(rf"^{marks} {re.escape(heading)}[ \t]*$", text, re.MULTILINE)
    assert match, f"deploy/README.md has no '{marks} {heading}' heading"
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented_metrics() -> dict[str, Row]:
    """Rows of the first table in Operations > Metrics whose header starts with 'metric'."""
    body = section(section(README.read_text(encoding="utf-8"), "Operations", 2), "Metrics", 3)
    lines = body.splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if ln.startswith("|") and cells(ln)[0].lower() == "metric"), None
    )
    assert start is not None, "no metrics table (header '| metric | type | labels | ... |') in Operations"
    rows: dict[str, Row] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name_cell, type_cell, label_cell, *_ = cells(line)
        names = _CODE.findall(name_cell)
        assert len(names) == 1, f"one backticked metric name per row: {line}"
        assert names[0] not in rows, f"{names[0]} is documented twice"
        rows[names[0]] = Row(type_cell.split()[0].lower(), frozenset(_CODE.findall(label_cell)))
    assert rows, "the metrics table is empty"
    return rows


def registered_metrics() -> dict[str, Row]:
    """Every family the code registers, by exposed name, with its type and label names."""
    metrics = Metrics()
    wrappers = {w._name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    found: dict[str, Row] = {}
    for family in metrics.registry.collect():
        wrapper = wrappers[family.name]
        labels = frozenset(wrapper._labelnames)
        if family.type == "info":  # an Info's labels are its keys, carried by its one sample
            labels = frozenset(family.samples[0].labels)
        found[family.name + _SUFFIX.get(family.type, "")] = Row(family.type, labels)
    return found


def test_the_metrics_table_names_exactly_the_registered_families() -> None:
    documented, registered = documented_metrics(), registered_metrics()
    missing = sorted(registered.keys() - documented.keys())
    stale = sorted(documented.keys() - registered.keys())
    assert not missing, f"metrics the code registers but deploy/README.md's Operations table lacks: {missing}"
    assert not stale, f"metrics deploy/README.md's table lists but the code does not register: {stale}"


def test_each_documented_metric_has_the_code_s_type_and_labels() -> None:
    documented, registered = documented_metrics(), registered_metrics()
    wrong = {
        name: {"readme": documented[name], "code": row}
        for name, row in registered.items()
        if name in documented and documented[name] != row
    }
    assert not wrong, f"deploy/README.md's metrics table disagrees with proxy/metrics.py: {wrong}"
