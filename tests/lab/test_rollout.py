"""The lab's rollout report: what the README demo prints after the pulls."""

from __future__ import annotations

from lab.rollout import NodePull, Rollout, rollout_table


def test_the_table_shows_each_node_and_the_registry_egress_against_the_image() -> None:
    rollout = Rollout(
        image_bytes=300_000_000,
        registry_bytes=300_500_000,
        pulls=[
            NodePull("node-1", 14.62, {"p2p": 0, "upstream": 300_000_000, "cache": 0}, 3.9),
            NodePull("node-2", 38.1, {"p2p": 300_000_000, "upstream": 0, "cache": 0}, 3.0),
        ],
        timeline=[],
    )
    lines = rollout_table(rollout).splitlines()
    assert lines[0].split() == ["node", "pull", "time", "from", "peers", "from", "registry", "from", "cache",
                                "shoal-node", "CPU"]  # fmt: skip
    assert lines[2].split() == ["node-1", "14.6", "s", "0.0", "MB", "300.0", "MB", "0.0", "MB", "3.9", "s"]
    assert lines[3].split() == ["node-2", "38.1", "s", "300.0", "MB", "0.0", "MB", "0.0", "MB", "3.0", "s"]
    assert lines[-1] == (
        "registry egress: 300.5 MB for 300.0 MB of layers"
        " (1.00 x the image; 2 direct pulls would cost 600.0 MB)"
    )
