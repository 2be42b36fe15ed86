import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ids import Digest, NodeId, Repository

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


@given(st.text())
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (Digest.parse, Repository.parse, NodeId.parse):
        with contextlib.suppress(ValueError):
            parse(text)
