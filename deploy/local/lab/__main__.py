"""`python -m lab up --nodes 3 [--rate 200mbit]`: a local lab cluster until Ctrl-C.
`python -m lab demo`: the README demo (a lab, an image pulled on every node at once, a table).
`python -m lab cleanup`: remove what a crashed lab left behind.

Run from deploy/local (or with PYTHONPATH=deploy/local), as root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from lab.cluster import PUSHER, READER, Cluster
from lab.demo import demo
from lab.netns import cleanup_stale


def usage(cluster: Cluster) -> str:
    net = cluster.network
    first = cluster.nodes[0]
    registry = cluster.registry.host
    lines = [
        f"lab {net.lab_id} is up: 10.77.{net.lab_id}.0/24, rate {cluster.rate or 'unlimited'},"
        f" work dir {cluster.workdir}",
        f"  registry   {net.namespace('registry')}  {net.ip('registry')}  https://{registry}"
        f"  (from here: {cluster.registry.url}, CA {cluster.ca_file})",
        f"  realm      {cluster.realm}  users {READER[0]}/{READER[1]}, {PUSHER[0]}/{PUSHER[1]}",
        f"  tracker    {net.namespace('tracker')}  {net.ip('tracker')}  {cluster.tracker_public_url}"
        f"  (from here: {cluster.tracker_url})  log {cluster.tracker_log_path}",
    ]
    for node in cluster.nodes:
        lines.append(
            f"  {node.name:<10} {node.namespace}  {node.ip}  docker -H {node.docker_host}"
            f"  admin {node.admin_url}  logs {node.log_path}, {node.dockerd_log_path}"
        )
    lines += [
        "",
        "pull on a node (its dockerd goes through its shoal-node; --image-mib pushes team/app:latest):",
        f"  docker -H {first.docker_host} login -u {READER[0]} -p {READER[1]} {registry}",
        f"  docker -H {first.docker_host} pull {registry}/team/app:latest",
        "look inside a node:",
        f"  ip netns exec {first.namespace} curl -s http://127.0.0.1:65002/status",
        "Ctrl-C stops everything and removes the namespaces.",
    ]
    return "\n".join(lines)


async def up(nodes: int, rate: str | None, workdir: Path | None, image_mib: int) -> None:
    started = time.monotonic()
    async with Cluster(nodes, rate=rate, workdir=workdir) as cluster:
        print(f"started in {time.monotonic() - started:.1f} s", flush=True)
        if image_mib:
            image = await cluster.push_image("team/app", [image_mib * 2**20 // 2] * 2)
            print(f"pushed {cluster.reference(image)} ({image_mib} MiB in 2 layers)", flush=True)
        print(usage(cluster), flush=True)
        await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels us


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a lab and keep it running until Ctrl-C")
    start.add_argument("--nodes", type=int, default=3)
    start.add_argument("--rate", help="per-link rate limit in tc syntax, e.g. 200mbit")
    start.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir, removed)")
    start.add_argument("--image-mib", type=int, default=0, help="push team/app:latest of this many MiB")
    show = commands.add_parser("demo", help="pull an image on every node of a fresh lab at once; a table")
    show.add_argument("--nodes", type=int, default=3)
    show.add_argument("--rate", default="200mbit", help="per-link rate limit in tc syntax")
    show.add_argument("--layer-mb", type=int, default=100, help="size of each of the image's 3 layers")
    show.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir, removed)")
    commands.add_parser("cleanup", help="remove namespaces, processes and files of crashed labs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "cleanup":
        removed = cleanup_stale()
        print("removed: " + (", ".join(removed) or "nothing"))
        return
    if args.command == "demo":
        run = demo(args.nodes, args.rate, args.layer_mb, args.workdir)
    else:
        run = up(args.nodes, args.rate, args.workdir, args.image_mib)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM: torn down
        asyncio.run(run)


if __name__ == "__main__":
    main()
