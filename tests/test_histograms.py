"""`FastHistogram` exposes exactly what prometheus_client's Histogram would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from epp.histograms import FastHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 1048576)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(
                st.sampled_from(BUCKETS),  # exactly on a bound: `le` is inclusive
                st.floats(min_value=0, max_value=2e6, allow_nan=False),
            ),
        ),
        max_size=50,
    )
)
def test_exposition_matches_prometheus_client(observations: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("h_seconds", "doc", ("k",), buckets=BUCKETS, registry=ours)
    slow = Histogram("h_seconds", "doc", ("k",), buckets=BUCKETS, registry=theirs)
    for label in ("a", "b"):  # both create the child at first use; start both alike
        fast.labels(label)
        slow.labels(label)
    for label, value in observations:
        fast.labels(label).observe(value)
        slow.labels(label).observe(value)
    expected = [line for line in generate_latest(theirs).splitlines() if b"_created" not in line]
    assert generate_latest(ours).splitlines() == expected


def test_removed_label_sets_leave_the_exposition() -> None:
    registry = CollectorRegistry()
    fast = FastHistogram("h", "doc", ("k",), buckets=(1.0,), registry=registry)
    fast.labels("gone").observe(0.5)
    fast.remove("gone")
    assert b'k="gone"' not in generate_latest(registry)
