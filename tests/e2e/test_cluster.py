"""The local lab: a whole cluster (registry, tracker, nodes with dockerd) in network namespaces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lab.cluster import Cluster
from lab.netns import ETC_NETNS, list_namespaces

pytestmark = pytest.mark.e2e

REPO = "team/app"


def lab_leftovers(lab_id: int, paths: list[Path]) -> list[str]:
    """Namespaces, /etc/netns dirs, mounts, files and processes of lab `lab_id` still around."""
    prefix = f"shoal-{lab_id}-"
    found = list_namespaces(prefix)
    found += [str(p) for p in ETC_NETNS.glob(f"{prefix}*")]
    found += [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if prefix in line]
    found += [str(path) for path in paths if path.exists()]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(str(path) in command for path in paths):
            found.append(f"process {pid}: {command}")
    return found


async def test_the_lab_leaves_nothing_behind() -> None:
    async with Cluster(nodes=1) as cluster:
        lab_id, paths = cluster.network.lab_id, [cluster.workdir, cluster.network.run_dir]
        assert len(list_namespaces(f"shoal-{lab_id}-")) == 4  # registry, tracker, node-1, switch
        assert (await cluster.nodes[0].docker("info", "--format", "{{.Name}}"))[0] == 0
    assert lab_leftovers(lab_id, paths) == []

    with pytest.raises(RuntimeError, match="boom"):
        async with Cluster(nodes=1) as cluster:
            lab_id, paths = cluster.network.lab_id, [cluster.workdir, cluster.network.run_dir]
            raise RuntimeError("boom")
    assert lab_leftovers(lab_id, paths) == []


async def test_tracker_and_node_come_back_after_sigkill() -> None:
    async with Cluster(nodes=1) as cluster:
        image = await cluster.push_image(REPO, [1_500_000])
        node = cluster.nodes[0]
        await cluster.kill_tracker()
        await cluster.start_tracker()
        await cluster.restart_node(0)
        await node.pull(cluster.reference(image))
        assert await node.metric("shoal_blob_bytes_total", source="upstream") > 1_500_000
        assert [blob["state"] for blob in (await node.status())["blobs"]] == ["seeding"]
        assert cluster.tracker_events("published", node=node.name, digest=image.layer_digests[0])
