"""Prometheus metrics of the events layer (default registry; labels are bounded sets)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

events_published = Counter(
    "tally_events_published_total", "Events published to the broker and confirmed.", ["event_type"]
)
outbox_publish_failures = Counter(
    "tally_outbox_publish_failures_total",
    "Outbox events whose publication failed; they stay pending and are retried.",
    ["reason"],
)
outbox_sweeps = Counter("tally_outbox_sweeps_total", "Completed sweeps over every merchant database.")
outbox_publish_lag = Histogram(
    "tally_outbox_publish_lag_seconds",
    "Time from an event's outbox insert to its confirmed publication.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)

events_consumed = Counter(
    "tally_events_consumed_total",
    "Events received by a consumer, by outcome: handled, duplicate, retried, parked.",
    ["event_type", "outcome"],
)
events_parked = Counter(
    "tally_events_parked_total", "Events sent to a parking queue as poison messages.", ["queue"]
)
event_handling = Histogram(
    "tally_event_handling_seconds", "Time to handle one event, transaction included.", ["event_type"]
)
