"""Value types parsed at the edge: every inner function takes these, never raw strings."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# distribution's reference grammar: path components joined by "/", lowercase alphanumerics with
# single separators ("." "_" "__" or runs of "-") inside a component.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REPOSITORY_MAX = 255
# Node ids are a peer certificate's CN, which libtorrent matches against torrent names: at most
# 64 characters, they can never equal a 71-character torrent name (see `Digest.torrent_name`).
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_decimal(text: str) -> bool:
    """Whether `text` is a non-negative integer in ASCII digits, as HTTP, URLs and YAML write one.

    `str.isdigit` alone also takes other scripts' digits ("٣", which `int` reads as 3) and
    superscripts ("²", which `int` refuses with a ValueError nobody expects there).
    """
    return text.isascii() and text.isdigit()


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest; shoal handles sha256 only, as the registry does for layers."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hex_part = text.partition(":")
        if sep != ":" or algorithm != "sha256" or not _SHA256_HEX.fullmatch(hex_part):
            raise ValueError(f"not a sha256 digest: {text[:80]!r}")
        return cls(hex_part)

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def torrent_name(self) -> str:
        """The blob's torrent name, which peer certificates carry as CN and DNS SAN.

        `sha256-<hex>`: a plain file name and a plain DNS-SAN string (no ":"), unique per blob.
        """
        return f"sha256-{self.hex}"

    @property
    def swarm_id(self) -> InfoHash:
        """What a node announces the blob's swarm under: peers are tracked per blob, not per chunk
        torrent, so announces do not grow with the number of chunks."""
        return InfoHash(bytes.fromhex(self.hex)[:20])


@dataclass(frozen=True, slots=True)
class Repository:
    name: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        if not text or len(text) > _REPOSITORY_MAX:
            raise ValueError(f"repository name must be 1 to {_REPOSITORY_MAX} characters")
        if not all(_PATH_COMPONENT.fullmatch(part) for part in text.split("/")):
            raise ValueError(f"not a repository name: {text[:80]!r}")
        return cls(text)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class NodeId:
    value: str

    @classmethod
    def parse(cls, text: str) -> NodeId:
        if not _NODE_ID.fullmatch(text):
            raise ValueError("node id must be 1-64 of [A-Za-z0-9._-], starting alphanumeric")
        return cls(text)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class InfoHash:
    """The 20-byte info-hash a v2 torrent announces with: its SHA-256 truncated (BEP 52)."""

    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> InfoHash:
        if len(raw) != 20:
            raise ValueError(f"info-hash must be 20 bytes, got {len(raw)}")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> InfoHash:
        return cls.parse(bytes.fromhex(text))

    @classmethod
    def from_v2(cls, sha256_of_info: bytes) -> InfoHash:
        return cls.parse(sha256_of_info[:20])

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return self.hex
