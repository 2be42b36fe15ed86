"""shoal-tracker: BitTorrent tracker, swarm CA and join authorization for a cluster."""
