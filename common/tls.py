"""TLS contexts for shoal's clients: always verified."""

from __future__ import annotations

import ssl


def client_ssl_context(ca: str | None) -> ssl.SSLContext:
    """System trust plus the operator's CA file, if any; certificate and host name verified."""
    context = ssl.create_default_context()
    if ca:
        context.load_verify_locations(cafile=ca)
    return context
