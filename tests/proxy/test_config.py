"""The node's configuration: defaults, validation that names the key, registry defaults."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, load_config
from proxy.__main__ import parse_args
from proxy.config import NodeConfig


def test_defaults() -> None:
    config = load_config(NodeConfig, {})
    assert config.listen == "127.0.0.1:65001"
    assert config.admin == "127.0.0.1:65002"
    assert config.tracker is None and config.tracker_ca is None
    assert config.node_id == socket.gethostname()
    assert config.cache_dir == Path("/var/lib/shoal-node")
    assert config.cache_max_bytes == 50 * 2**30
    assert config.peer_listen == "0.0.0.0:6881"
    assert config.docker_certs_dir == Path("/etc/docker/certs.d")
    assert config.p2p_min_bytes == 2**20
    assert (config.stall_timeout, config.shutdown_grace) == (20, 30)
    assert config.registries == ()


def test_registry_defaults() -> None:
    config = load_config(
        NodeConfig,
        {"registries": [{"host": "Reg.Example:5000"}, {"host": "plain.example:80", "insecure": True},
                        {"host": "reg.internal:443", "url": "https://10.0.0.5:8443/", "ca": "/etc/ca.pem"}]},
    )  # fmt: skip
    secure, plain, moved = config.registries
    assert (secure.host, secure.name, secure.base_url) == (
        "reg.example:5000",
        "reg.example",
        "https://reg.example:5000",
    )
    assert plain.base_url == "http://plain.example:80"
    assert (moved.base_url, moved.name, moved.ca) == (
        "https://10.0.0.5:8443",
        "reg.internal",
        Path("/etc/ca.pem"),
    )
    assert config.registry("REG.example:5000") is secure
    assert config.registry("reg.example:443") is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listen": "0.0.0.0:65001"}, "listen"),
        ({"listen": "10.1.2.3:65001"}, "listen"),
        ({"listen": "localhost:65001"}, "listen"),
        ({"admin": "nowhere"}, "admin"),
        ({"tracker": "tracker.example:8443"}, "tracker"),
        ({"cache_max_bytes": "lots"}, "cache_max_bytes"),
        ({"stall_timeout": "soon"}, "stall_timeout"),
        ({"node_id": "has space"}, "node_id"),
        ({"node_id": "x" * 65}, "node_id"),
        ({"log_level": "loud"}, "log_level"),
        ({"registries": [{"host": "no-port"}]}, "registries[0]"),
        ({"registries": [{"host": "a:1"}, {"host": "b:x"}]}, "registries[1]"),
        ({"registries": [{"host": "a:\u0665\u0660\u0660\u0660"}]}, "registries[0]"),  # Arabic-Indic 5000
        ({"registries": [{"host": "a:1", "insecure": "yes"}]}, "registries[0].insecure"),
        ({"registries": [{"host": "a:1", "url": "a:1"}]}, "registries[0].url"),
        ({"registries": [{"host": "a:1", "url": "https://a:1/prefix"}]}, "registries[0]"),
        ({"registries": [{"host": "a:1"}, {"host": "A:1"}]}, "registries"),
        ({"registries": [{"url": "https://a"}]}, "registries[0].host"),
        ({"listen_on": "x"}, "listen_on"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(NodeConfig, data)
    message = str(error.value)
    assert message.startswith(f"{key}:") or f": {key}:" in message, message


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("listen: 127.0.0.1:7000\nnode_id: from-file\nregistries:\n  - host: r.example:5000\n")
    config = parse_args(
        ["--config", str(path), "--node-id", "from-flag", "--tracker", "https://t.example:8443"]
    )
    assert (config.listen, config.node_id, config.tracker) == (
        "127.0.0.1:7000",
        "from-flag",
        "https://t.example:8443",
    )
    assert parse_args(["--config", str(path), "--listen", "127.0.0.2:7001"]).listen == "127.0.0.2:7001"
    with pytest.raises(ConfigError, match="listen"):
        parse_args(["--config", str(path), "--listen", "0.0.0.0:7001"])
