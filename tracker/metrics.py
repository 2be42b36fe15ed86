"""Every Prometheus metric of the tracker, in one registry, prefixed `shoal_tracker_`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class TrackerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.joins = Counter(
            "shoal_tracker_joins_total", "Authorized joins by the role handed out",
            ["role"], registry=self.registry,
        )  # fmt: skip
        self.join_denied = Counter(
            "shoal_tracker_join_denied_total", "Refused joins by reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.announces = Counter(
            "shoal_tracker_announces_total", "Announces answered with peers", registry=self.registry
        )
        self.announce_failures = Counter(
            "shoal_tracker_announce_failures_total", "Announces refused with a failure reason",
            registry=self.registry,
        )  # fmt: skip
        self.published = Counter(
            "shoal_tracker_torrents_published_total", "Torrents accepted from origins",
            registry=self.registry,
        )  # fmt: skip
        self.withdrawn = Counter(
            "shoal_tracker_torrents_withdrawn_total", "Torrents withdrawn after a digest mismatch",
            registry=self.registry,
        )  # fmt: skip
        self.reports = Counter(
            "shoal_tracker_reports_total", "Reports from nodes by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
