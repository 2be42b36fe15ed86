"""PeerConfig: the keys the node's YAML fills, and what libtorrent is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from peer.config import PeerConfig
from peer.session import settings


def test_defaults() -> None:
    config = PeerConfig()
    assert config.peer_listen == "0.0.0.0:6881"
    assert config.stall_timeout == 20
    assert config.listen_interfaces == "0.0.0.0:6881s"  # SSL only


def test_from_yaml_values() -> None:
    config = load_config(
        PeerConfig,
        {
            "cache_dir": "/srv/cache",
            "cache_max_bytes": "2GiB",
            "stall_timeout": "1m",
            "peer_listen": "[::]:7000",
        },
    )
    assert config.cache_dir == Path("/srv/cache")
    assert config.cache_max_bytes == 2 * 2**30
    assert config.stall_timeout == 60
    assert config.listen_interfaces == "[::]:7000s"


@pytest.mark.parametrize(
    "bad", [{"peer_listen": "localhost:1"}, {"stall_timeout": 0}, {"stream_window": 0}, {"dht": True}]
)
def test_bad_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config(PeerConfig, bad)


def test_session_settings_are_private_tcp_and_ssl_only() -> None:
    pack = settings(PeerConfig(peer_listen="10.0.0.1:6881", upload_rate_limit=1000))
    assert pack["listen_interfaces"] == "10.0.0.1:6881s"
    for off in (
        "enable_dht",
        "enable_lsd",
        "enable_upnp",
        "enable_natpmp",
        "enable_incoming_utp",
        "enable_outgoing_utp",
    ):
        assert pack[off] is False  # type: ignore[literal-required]
    assert pack["upload_rate_limit"] == 1000
    assert pack["ignore_limits_on_local_network"] is False
