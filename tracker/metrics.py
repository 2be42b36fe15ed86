"""Every Prometheus metric of the tracker, in one registry, prefixed `shoal_tracker_`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class TrackerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.joins = Counter("shoal_tracker_joins_total", "Authorized joins", registry=self.registry)
        self.join_denied = Counter(
            "shoal_tracker_join_denied_total", "Refused joins by reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.syncs = Counter(
            "shoal_tracker_syncs_total", "Sync calls (long-polls for new chunks and leases)",
            registry=self.registry,
        )  # fmt: skip
        self.chunk_leases = Counter(
            "shoal_tracker_chunk_leases_total", "Chunk leases granted to origins", registry=self.registry
        )
        self.announces = Counter(
            "shoal_tracker_announces_total", "Announces answered with peers", registry=self.registry
        )
        self.announce_failures = Counter(
            "shoal_tracker_announce_failures_total", "Announces refused with a failure reason",
            registry=self.registry,
        )  # fmt: skip
        self.published = Counter(
            "shoal_tracker_torrents_published_total", "Chunk torrents accepted from origins",
            registry=self.registry,
        )  # fmt: skip
        self.withdrawn = Counter(
            "shoal_tracker_torrents_withdrawn_total",
            "Chunk torrents withdrawn because the registry's bytes did not match them",
            registry=self.registry,
        )
        self.reports = Counter(
            "shoal_tracker_reports_total", "Reports from nodes by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self.verify_bytes = Counter(
            "shoal_tracker_verify_bytes_total", "Blob bytes read from registries to check reports",
            registry=self.registry,
        )  # fmt: skip
