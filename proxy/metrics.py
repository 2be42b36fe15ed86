"""Every Prometheus metric of the node, in one registry, prefixed `shoal_`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

BLOB_SOURCES = ("p2p", "upstream", "cache")
CONNECTION_ACTIONS = ("intercept", "tunnel", "plain", "reject", "refused")
REQUEST_KINDS = ("blob", "manifest", "other")
# no_swarm: the tracker refused or could not be reached; no_chunk: nothing arrived for a chunk for
# stall_timeout; origin_failed: this node's own registry download of a chunk failed; peer_error:
# the chunk's torrent failed; disk_error: this node's disk failed the layer (see DISK_OPERATIONS).
# (A stalled torrent refilled from the registry is not a switch.)
FALLBACK_REASONS = ("no_swarm", "no_chunk", "origin_failed", "peer_error", "disk_error")
# chunk_write: a chunk this node fetches from the registry, into its file; chunk_read: a chunk file
# read for a client or hashed for its torrent; torrent: libtorrent reading or writing a chunk file;
# commit: hashing a layer's chunk files and writing its marker; seed_state: what seeding after a
# restart needs (credentials, chunk metainfo).
DISK_OPERATIONS = ("chunk_write", "chunk_read", "torrent", "commit", "seed_state")


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.blob_bytes = Counter(
            "shoal_blob_bytes_total",
            "Bytes of layer blobs sent to clients, by where they came from",
            ["source"], registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "shoal_proxy_requests_total",
            "Registry requests answered inside intercepted or plain connections, by kind and status",
            ["kind", "status"], registry=self.registry,
        )  # fmt: skip
        self.connections = Counter(
            "shoal_proxy_connections_total",
            "Proxy connections by what was done with them (refused: not a loopback client)",
            ["action"], registry=self.registry,
        )  # fmt: skip
        self.p2p_fallbacks = Counter(
            "shoal_p2p_fallbacks_total",
            "Times a layer response went on from the registry because the swarm could not, by reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.registry_retries = Counter(
            "shoal_registry_retries_total",
            "Times the rest of a layer was asked for again after the registry failed part way",
            registry=self.registry,
        )  # fmt: skip
        self.disk_errors = Counter(
            "shoal_disk_errors_total",
            "Times the cache disk failed a layer (full or failing); the layer went on from the registry",
            ["operation"], registry=self.registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "shoal_proxy_upstream_errors_total",
            "Registry requests that failed before or while streaming the response",
            registry=self.registry,
        )  # fmt: skip
        for source in BLOB_SOURCES:
            self.blob_bytes.labels(source)
        for action in CONNECTION_ACTIONS:
            self.connections.labels(action)
        for reason in FALLBACK_REASONS:
            self.p2p_fallbacks.labels(reason)
        for operation in DISK_OPERATIONS:
            self.disk_errors.labels(operation)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Counter values by metric and label values, for /status."""
        values: dict[str, dict[str, float]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                label = ",".join(sample.labels.values()) or "value"
                values.setdefault(sample.name, {})[label] = sample.value
        return values
