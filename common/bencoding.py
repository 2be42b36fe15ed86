"""Bencode (BEP 3) at one boundary: bencode.py's exceptions become `ValueError` here."""

from __future__ import annotations

from typing import Any

import bencodepy

Bencodable = int | bytes | str | list[Any] | dict[bytes, Any] | dict[str, Any]


def encode(value: Bencodable) -> bytes:
    return bytes(bencodepy.encode(value))


def decode(data: bytes) -> Any:
    """Decode one bencoded value; anything malformed or trailing raises `ValueError`."""
    try:
        return bencodepy.decode(data)
    except (bencodepy.BencodeDecodeError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed bencode: {exc}") from None


def decode_canonical(data: bytes) -> Any:
    """Decode and insist the input is canonical, so hashes of re-encoded parts match the input."""
    value = decode(data)
    if encode(value) != data:
        raise ValueError("bencode is not canonical (unsorted keys or non-minimal integers)")
    return value
