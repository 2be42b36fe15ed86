"""Test support: a real distribution registry with TLS and token auth, its token issuer, pushes."""
