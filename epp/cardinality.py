"""Label values that clients choose, kept to a bounded number of Prometheus series.

A client picks the `model` it sends, the rewrite header, its workload id; a model server
picks its error statuses. Each distinct value used as a label creates series that live
until removed, so without a bound any client can grow the picker's memory and make a
`/metrics` scrape take seconds. Two mechanisms, applied in order:

* `KnownModels`: a model name keeps its own label only when the picker knows it — the
  models the pool's servers report (the `model_name` label of their metrics, their LoRA
  adapters) and the models `InferenceModelRewrite` objects name. Anything else is
  `OVERFLOW` (`other`).
* `LabelSets`: at most `limit` distinct label sets of one kind are live at a time; a new
  one beyond that is recorded under the kind's overflow set. A set unused for `idle_s`
  is released (its series removed), so models and workloads that went away free room.

The numbers are documented in docs/configuration.md ("Metric series are bounded").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

OVERFLOW: Final = "other"

MAX_KNOWN_MODELS: Final = 256
"""Model names that may keep their own label (servers' models, adapters, rewrites)."""

SERIES_IDLE_S: Final = 600.0
"""A label set unused this long has its series removed (counters restart from zero)."""

# Statuses a model server or Envoy answers that keep their own `upstream_<status>` code;
# any other becomes `upstream_4xx` / `upstream_5xx`.
_UPSTREAM_STATUSES: Final = frozenset(
    {400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 501, 502, 503, 504}
)


def upstream_error_code(status: int) -> str:
    if status in _UPSTREAM_STATUSES:
        return f"upstream_{status}"
    return "upstream_5xx" if status >= 500 else "upstream_4xx"


class KnownModels:
    """The model names that keep their own label. Read on the hot path.

    The picker gives it a `source` (computing the names from the pool) and marks it stale
    when what the source reads changed; an unknown name then triggers one recomputation,
    so a model is known from its server's first scrape, not from the next periodic refresh.
    """

    __slots__ = ("_known", "_stale", "limit", "source")

    def __init__(self, limit: int = MAX_KNOWN_MODELS) -> None:
        self.limit = limit
        self.source: Callable[[], Iterable[str]] | None = None
        self._known: frozenset[str] = frozenset()
        self._stale = False

    def replace(self, names: Iterable[str]) -> None:
        """Set the known names; beyond `limit`, the alphabetically first are kept (stable
        from one refresh to the next, so labels do not flap)."""
        unique = {n for n in names if n}
        if len(unique) > self.limit:
            unique = set(sorted(unique)[: self.limit])
        self._known = frozenset(unique)
        self._stale = False

    def mark_stale(self) -> None:
        self._stale = True

    def label(self, model: str) -> str:
        if model in self._known:
            return model
        if self._stale and self.source is not None:
            self.replace(self.source())
            if model in self._known:
                return model
        return OVERFLOW

    def __contains__(self, model: object) -> bool:
        return model in self._known

    def __len__(self) -> int:
        return len(self._known)


class LabelSets:
    """At most `limit` live label sets of one kind, plus the kind's `overflow` set."""

    __slots__ = ("_last_used", "_overflow_used", "limit", "overflow", "overflowed")

    def __init__(self, limit: int, overflow: tuple[str, ...]) -> None:
        self.limit = limit
        self.overflow = overflow
        self.overflowed = 0  # label sets folded because the limit was reached
        self._last_used: dict[tuple[str, ...], float] = {}
        self._overflow_used: float | None = None

    def admit(self, labels: tuple[str, ...], now: float) -> tuple[str, ...]:
        """The label set to record under: `labels` if live or there is room, else the
        overflow set."""
        last_used = self._last_used
        if labels in last_used or len(last_used) < self.limit:
            if labels != self.overflow:
                last_used[labels] = now
                return labels
        else:
            self.overflowed += 1
        self._overflow_used = now
        return self.overflow

    def release(self, labels: tuple[str, ...]) -> None:
        self._last_used.pop(labels, None)

    def idle(self, now: float, idle_s: float) -> list[tuple[str, ...]]:
        """Release and return the label sets (the overflow set too) unused for `idle_s`."""
        limit = now - idle_s
        gone = [labels for labels, used in self._last_used.items() if used <= limit]
        for labels in gone:
            del self._last_used[labels]
        if self._overflow_used is not None and self._overflow_used <= limit:
            self._overflow_used = None
            gone.append(self.overflow)
        return gone

    def __len__(self) -> int:
        """Live label sets, not counting the overflow set."""
        return len(self._last_used)

    def __contains__(self, labels: object) -> bool:
        return labels in self._last_used
