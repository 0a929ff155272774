"""The metric names a Grafana dashboard's PromQL queries read.

Enough of PromQL to find selectors: strings, label matchers (`{...}`), ranges and
subqueries (`[...]`), grouping clauses (`by (...)`, `on (...)`) and Grafana variables are
removed; what is left and is neither a function call, a keyword nor a number is a metric
name. Template queries (`label_values(metric{...}, label)`) count too: they fill the
dashboard's drop-downs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "bool", "offset", "inf", "nan", "atan2",
    }
)  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Names of the metrics a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("1", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def template_metric_names(query: str) -> set[str]:
    """Names a Grafana Prometheus variable query reads (`label_values(expr, label)` or a
    plain expression)."""
    found = _LABEL_VALUES.match(query)
    return metric_names(found.group(1) if found else query)


@dataclass(frozen=True, slots=True)
class Query:
    where: str  # the panel title or variable name, for messages
    names: frozenset[str]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    queries = [
        Query(f"panel {panel.get('title')!r}", frozenset(metric_names(target["expr"])))
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append(
                Query(f"variable {variable['name']!r}", frozenset(template_metric_names(text)))
            )
    return queries
