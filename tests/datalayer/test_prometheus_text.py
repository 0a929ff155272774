from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.datalayer import prometheus_text
from epp.datalayer.prometheus_text import MetricsPage, PrometheusParseError, parse
from tests.datalayer import pages


def test_full_vllm_page_parses_without_errors() -> None:
    text = pages.vllm_page(waiting=3, running=7, kv_usage=0.42)
    result = parse(text)
    assert result.errors == []
    assert len(text.splitlines()) > 300  # the size of a real page
    assert result.types["vllm:num_requests_waiting"] == "gauge"
    assert result.types["vllm:time_to_first_token_seconds"] == "histogram"
    assert result.types["python_gc_objects_collected_total"] == "counter"
    assert result.help["vllm:num_requests_waiting"] == "Number of requests waiting to be processed."
    (waiting,) = result.by_name("vllm:num_requests_waiting")
    assert waiting.value == 3.0
    assert waiting.labels == {"engine": "0", "model_name": pages.VLLM_MODEL}
    # Histogram series are plain samples under their own names.
    buckets = result.by_name("vllm:time_to_first_token_seconds_bucket")
    assert buckets[-1].labels["le"] == "+Inf"
    assert len(result.by_name("vllm:time_to_first_token_seconds_count")) == 1
    assert len(result.by_name("vllm:time_to_first_token_seconds_sum")) == 1


def test_lazy_page_agrees_with_full_parse_for_every_name() -> None:
    for text in (
        pages.vllm_page(lora_series=[("a,b", "", 4, 1.7e9), ("a", "c", 4, 1.8e9)]),
        pages.sglang_page(queue=2, running=5, token_usage=0.3),
    ):
        full = parse(text)
        page = MetricsPage(text)
        for name in {sample.name for sample in full.samples}:
            assert page.samples(name) == full.by_name(name), name
        assert page.errors == []


def test_lazy_page_parses_only_what_is_asked_and_caches_it() -> None:
    page = MetricsPage(pages.vllm_page(waiting=2))
    first = page.samples("vllm:num_requests_waiting")
    assert [s.value for s in first] == [2.0]
    assert page.samples("vllm:num_requests_waiting") is first
    assert page.samples("vllm:no_such_metric") == []


def test_metric_name_prefixes_do_not_collide() -> None:
    text = 'foo_bucket{le="1"} 1\nfoo_sum 2\nfoo 3\nfoo{a="b"} 4\n'
    page = MetricsPage(text)
    assert [s.value for s in page.samples("foo")] == [3.0, 4.0]
    assert [s.value for s in page.samples("foo_bucket")] == [1.0]
    assert page.samples("fo") == []


def test_first_line_last_line_without_newline_and_crlf() -> None:
    text = 'a 1\r\nb{x="y"} 2\r\n# comment\r\n\r\nc 3'
    page = MetricsPage(text)
    assert page.samples("a")[0].value == 1.0
    assert page.samples("b")[0] == prometheus_text.Sample("b", {"x": "y"}, 2.0)
    assert page.samples("c")[0].value == 3.0
    assert [s.name for s in parse(text).samples] == ["a", "b", "c"]


def test_label_value_escapes() -> None:
    text = 'm{path="C:\\\\dir",quote="say \\"hi\\"",multi="one\\ntwo",empty=""} 1\n'
    (sample,) = parse(text).samples
    assert sample.labels == {
        "path": "C:\\dir",
        "quote": 'say "hi"',
        "multi": "one\ntwo",
        "empty": "",
    }
    assert MetricsPage(text).samples("m") == [sample]


def test_label_value_with_comma_brace_and_equals_inside_quotes() -> None:
    (sample,) = parse('m{a="x,y}=z",b="2",} 5\n').samples
    assert sample.labels == {"a": "x,y}=z", "b": "2"}


def test_special_values_and_timestamps() -> None:
    text = "\n".join(
        [
            "a NaN",
            "b +Inf",
            "c -Inf",
            "d 1.5e-3 1712345678901",
            'e{x="1"} -2 -5',
            "f   7   ",
            "g\t8",
        ]
    )
    by_name = {s.name: s for s in parse(text).samples}
    assert math.isnan(by_name["a"].value)
    assert by_name["b"].value == math.inf
    assert by_name["c"].value == -math.inf
    assert by_name["d"] == prometheus_text.Sample("d", {}, 0.0015, 1712345678901)
    assert by_name["e"].timestamp_ms == -5
    assert by_name["f"].value == 7.0
    assert by_name["g"].value == 8.0


def test_help_text_escapes_and_plain_comments() -> None:
    text = "# HELP m first\\nsecond \\\\ end\n# just a comment\n#\n# TYPE m untyped\nm 1\n"
    result = parse(text)
    assert result.help["m"] == "first\nsecond \\ end"
    assert result.types["m"] == "untyped"
    assert MetricsPage(text).metric_type("m") == "untyped"
    assert MetricsPage(text).metric_type("other") is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("m", "missing sample value"),
        ("m{", "malformed label"),
        ('m{a="1"', "expected ',' or '}'"),
        ('m{a="1" b="2"} 1', "expected ',' or '}'"),
        ("m{a=1} 1", "malformed label"),
        ('m{a="1",a="2"} 1', "duplicate label name"),
        ('m{a="\\q"} 1', "invalid escape sequence"),
        ("m one", "invalid sample value"),
        ("m 1_000", "invalid sample value"),
        ("m 1 2 3", "unexpected text"),
        ("m 1 12.5", "invalid timestamp"),
        ("m-x 1", "invalid character"),
        ('{a="b"} 1', "expected a metric name"),
        ("9m 1", "expected a metric name"),
        ("# TYPE m flavour", "unknown metric type"),
        ("# TYPE 9 gauge", "needs a valid metric name"),
    ],
)
def test_malformed_lines_name_line_and_reason(line: str, reason: str) -> None:
    text = f"ok 1\n{line}\nalso_ok 2\n"
    with pytest.raises(PrometheusParseError) as caught:
        parse(text)
    assert caught.value.line_no == 2
    assert reason in str(caught.value)
    assert repr(line) in str(caught.value)
    lenient = parse(text, strict=False)
    assert [s.name for s in lenient.samples] == ["ok", "also_ok"]
    assert len(lenient.errors) == 1
    assert lenient.errors[0].startswith("line 2:")


def test_lazy_page_skips_malformed_lines_and_records_why() -> None:
    page = MetricsPage('m 1\nm{a="1" 2\nm 3\n')
    assert [s.value for s in page.samples("m")] == [1.0, 3.0]
    assert len(page.errors) == 1
    assert "expected ',' or '}'" in page.errors[0]


def test_second_type_line_is_an_error() -> None:
    with pytest.raises(PrometheusParseError, match="second TYPE line"):
        parse("# TYPE m gauge\n# TYPE m counter\n")


def test_long_malformed_line_is_shortened_in_the_message() -> None:
    line = "m{" + "a" * 500
    with pytest.raises(PrometheusParseError) as caught:
        parse(line)
    assert len(str(caught.value)) < 300


_label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@given(
    values=st.dictionaries(
        st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True), _label_text, max_size=5
    ),
    number=st.floats(allow_nan=False),
    timestamp=st.none() | st.integers(min_value=-(2**62), max_value=2**62),
)
def test_any_label_values_and_numbers_round_trip(
    values: dict[str, str], number: float, timestamp: int | None
) -> None:
    escaped = ",".join(
        '{}="{}"'.format(key, value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for key, value in values.items()
    )
    rendered = repr(number).replace("inf", "Inf")
    line = f"metric{{{escaped}}} {rendered}" + ("" if timestamp is None else f" {timestamp}")
    expected = prometheus_text.Sample("metric", values, number, timestamp)
    assert parse(line).samples == [expected]
    assert MetricsPage(line).samples("metric") == [expected]


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises_anything_but_parse_errors(text: str) -> None:
    result = parse(text, strict=False)
    assert len(result.samples) + len(result.errors) <= text.count("\n") + 1 + text.count("\r")
    page = MetricsPage(text)
    for name in ("m", "a", "vllm:x"):
        page.samples(name)


def test_lazy_samples_are_shared_across_pages_and_read_only() -> None:
    text = 'cached_metric{a="1",b="2"} 5\n'
    first = MetricsPage(text).samples("cached_metric")[0]
    again = MetricsPage(text).samples("cached_metric")[0]
    assert again is first  # an unchanged line is not parsed twice
    with pytest.raises(TypeError):
        first.labels["a"] = "x"  # type: ignore[index]
    changed = MetricsPage(text.replace(" 5", " 6")).samples("cached_metric")[0]
    assert changed.value == 6.0 and changed.labels == {"a": "1", "b": "2"}


def test_lazy_scan_stops_at_the_next_family_but_reads_interleaved_histograms() -> None:
    page = MetricsPage(
        "# TYPE h histogram\n"
        'h_bucket{le="1",a="x"} 1\nh_sum{a="x"} 2\nh_count{a="x"} 3\n'
        'h_bucket{le="1",a="y"} 4\nh_sum{a="y"} 5\nh_count{a="y"} 6\n'
        "# TYPE g gauge\ng 7\n"
        "# TYPE other gauge\nother 1\n"
        "g 99\n"  # breaks the one-group rule; the scan has stopped before it
    )
    assert [s.value for s in page.samples("h_bucket")] == [1.0, 4.0]
    assert [s.value for s in page.samples("h_count")] == [3.0, 6.0]
    assert [s.value for s in page.samples("g")] == [7.0]
