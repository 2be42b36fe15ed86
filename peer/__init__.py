"""The node's BitTorrent engine: a blob as chunk torrents (SSL, v2), in-order streaming, the blob cache.

The node daemon uses `peer.engine.Peer` (see its module docstring); nothing else here is API.
"""
