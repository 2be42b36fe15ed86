"""The node's BitTorrent engine: SSL v2 torrents, in-order streaming, the blob cache.

The node daemon uses `peer.engine.Peer` (see its module docstring); nothing else here is API.
"""
