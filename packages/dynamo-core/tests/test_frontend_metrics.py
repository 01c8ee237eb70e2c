"""The frontend's histograms (`ModelHistogram`) against prometheus_client's own `Histogram`."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_core.frontend.metrics import FrontendMetrics, ModelHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one family, `_created` left out."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_exposition_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = ModelHistogram("x_seconds", "doc", BUCKETS, ours)
    ref = Histogram("x_seconds", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    rng = random.Random(7)
    # values on bucket edges too: a value equal to a bound belongs to that bound's bucket
    values = [*BUCKETS, 0.0, 5.0, *(rng.uniform(0, 2) for _ in range(200))]
    for i, value in enumerate(values):
        model = ("a", "b")[i % 2]
        mine.labels(model).observe(value)
        ref.labels(model).observe(value)
    assert samples(ours, "x_seconds") == samples(theirs, "x_seconds")


def test_observe_with_a_count_is_that_many_observations() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = ModelHistogram("x_seconds", "doc", BUCKETS, ours)
    ref = Histogram("x_seconds", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    for value, count in ((0.0005, 7), (0.05, 3), (3.0, 1)):
        mine.labels("m").observe(value, count)
        for _ in range(count):
            ref.labels("m").observe(value)
    got = samples(ours, "x_seconds")
    assert got == samples(theirs, "x_seconds")
    assert got[("x_seconds_count", (("model", "m"),))] == 11


def test_frontend_metrics_render_every_family() -> None:
    m = FrontendMetrics()
    m.itl.labels("tiny").observe(0.002, 31)
    m.ttft.labels("tiny").observe(0.02)
    text = m.render().decode()
    assert 'dynamo_frontend_inter_token_latency_seconds_count{model="tiny"} 31.0' in text
    assert "# TYPE dynamo_frontend_time_to_first_token_seconds histogram" in text
