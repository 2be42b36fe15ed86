import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ids import Digest, NodeId, Repository, is_decimal

HEX = "a" * 64


def test_digest() -> None:
    digest = Digest.parse(f"sha256:{HEX}")
    assert str(digest) == f"sha256:{HEX}" and digest.torrent_name == f"sha256-{HEX}"


@pytest.mark.parametrize("bad", ["", HEX, f"sha512:{HEX}", f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}"])
def test_bad_digests(bad: str) -> None:
    with pytest.raises(ValueError):
        Digest.parse(bad)


@pytest.mark.parametrize("good", ["busybox", "library/busybox", "a/b-c/d__e", "x.y_z", "a--b"])
def test_repositories(good: str) -> None:
    assert str(Repository.parse(good)) == good


@pytest.mark.parametrize("bad", ["", "Upper", "a//b", "/a", "a/", "-a", "a" * 256, "a..b", "../etc"])
def test_bad_repositories(bad: str) -> None:
    with pytest.raises(ValueError):
        Repository.parse(bad)


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a~b", "x" * 65, "sha256:abc"])
def test_bad_node_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        NodeId.parse(bad)


@pytest.mark.parametrize(
    ("text", "decimal"),
    [
        ("0", True), ("0042", True), ("65535", True),
        ("", False), ("-1", False), ("+1", False), (" 1", False), ("1_000", False), ("1.5", False),
        # Arabic-Indic 3, Devanagari 12, fullwidth 1, superscript 2: str.isdigit takes them all
        ("\u0663", False), ("\u0967\u0968", False), ("\uff11", False), ("\u00b2", False), ("1\u00b2", False),
    ],
)  # fmt: skip
def test_is_decimal_takes_ascii_digits_only(text: str, decimal: bool) -> None:
    assert is_decimal(text) is decimal


@given(st.text())
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (Digest.parse, Repository.parse, NodeId.parse):
        with contextlib.suppress(ValueError):
            parse(text)
