"""Peer throughput over SSL: one seeder and 1-3 leechers, on loopback and across rate-limited links.

The blob is one chunk torrent, or chunk torrents of `--chunk-mib` each (all seeded by the seeder).

Each peer is its own process (`tests.peer.node`). On loopback the peers use 127.0.0.x; with
namespaces (root only) each peer gets a network namespace joined to a bridge by a veth pair
whose both ends are limited to RATE with `tbf`, so every peer has one RATE link, as on a cluster.
Reported per run: leecher throughput (blob size over first-piece-to-finished time), as MB/s and as
a ratio to the link rate, and CPU seconds of all peers per GiB received. Namespaces are removed on
exit, also after a failure or Ctrl-C.

    python3 tests/bench/peer.py [--size-mib 256] [--chunk-mib 64] [--rate-mbit 1000] [--no-netns]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))  # `lab`
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.procstat import cpu_seconds

from tests.peer.swarm import MiB, Node, Swarm, make_blob

PREFIX = "shoalb"  # namespace and interface names start with this
SUBNET = "10.231.0"
RUN_TIMEOUT = 40.0


@dataclass
class Result:
    where: str
    peers: int
    piece_kib: int
    mbytes_per_s: float  # median leecher
    ratio: float | None  # to the link rate
    cpu_per_gib: float


def sh(*args: str, check: bool = True) -> None:
    subprocess.run(args, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Lab:
    """A bridge namespace and one namespace per peer, each behind a `tbf`-limited veth pair."""

    def __init__(self, peers: int, rate_mbit: int) -> None:
        self.names = [f"{PREFIX}{i}" for i in range(peers)]
        self.hub = f"{PREFIX}hub"
        self.rate = f"{rate_mbit}mbit"

    def ip(self, index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    def wrap(self, index: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[index])

    def __enter__(self) -> Lab:
        cleanup()
        sh("ip", "netns", "add", self.hub)
        hub = ("ip", "-n", self.hub)
        sh(*hub, "link", "add", "br0", "type", "bridge")
        sh(*hub, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            sh("ip", "netns", "add", name)
            sh(
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                name,
                "type",
                "veth",
                "peer",
                "name",
                f"p{index}",
                "netns",
                self.hub,
            )
            sh("ip", "-n", name, "addr", "add", f"{self.ip(index)}/24", "dev", "eth0")
            for link in (("-n", name, "eth0"), ("-n", self.hub, f"p{index}")):
                sh("ip", link[0], link[1], "link", "set", link[2], "up")
                sh("tc", link[0], link[1], "qdisc", "add", "dev", link[2], "root", "tbf",
                   "rate", self.rate, "burst", "256kb", "latency", "20ms")  # fmt: skip
            sh("ip", "-n", self.hub, "link", "set", f"p{index}", "master", "br0")
            sh("ip", "-n", name, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        cleanup()


def cleanup() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            sh("ip", "netns", "del", name, check=False)


async def run_swarm(
    root: Path, swarm: Swarm, peers: int, ips: list[str], wraps: list[tuple[str, ...]]
) -> tuple[list[dict[str, float]], float]:
    nodes: list[Node] = []
    try:
        nodes.append(await swarm.start(swarm.job("p0", ips[0], "seed"), wraps[0]))
        for index in range(1, peers):
            job = swarm.job(f"p{index}", ips[index], "fetch", connect=[n.address for n in nodes])
            nodes.append(await swarm.start(job, wraps[index]))
        before = sum(cpu_seconds(node.proc.pid) for node in nodes)
        done = [await node.event("complete", RUN_TIMEOUT) for node in nodes[1:]]
        cpu = sum(cpu_seconds(node.proc.pid) for node in nodes) - before
        return done, cpu
    finally:
        await swarm.close()
        swarm.procs.clear()
        for index in range(peers):
            shutil.rmtree(root / f"p{index}", ignore_errors=True)


async def measure(
    root: Path, swarm: Swarm, where: str, peers: int, rate_mbit: int | None, lab: Lab | None
) -> Result:
    ips = [lab.ip(i) for i in range(peers)] if lab else [f"127.0.0.{i + 2}" for i in range(peers)]
    wraps = [lab.wrap(i) for i in range(peers)] if lab else [() for _ in range(peers)]
    done, cpu = await run_swarm(root, swarm, peers, ips, wraps)
    size = swarm.blob.size
    rates = [size / (event["finished"] - event["first_piece"]) / 1e6 for event in done]
    median = statistics.median(rates)
    ratio = median / (rate_mbit / 8) if rate_mbit else None
    gib = size * (peers - 1) / 2**30
    return Result(where, peers, swarm.piece_size // 1024, median, ratio, cpu / gib)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=0, help="a power of two; 0: one chunk")
    parser.add_argument("--rate-mbit", type=int, default=1000)
    parser.add_argument("--no-netns", action="store_true", help="loopback only")
    args = parser.parse_args()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM unwinds like Ctrl-C: peers stopped, namespaces removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    netns = not args.no_netns
    if netns and os.geteuid() != 0:
        raise SystemExit("network namespaces need root: run as root or pass --no-netns")
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        root = Path(tmp)
        blob = make_blob(root, args.size_mib * MiB)
        swarms = {
            size: Swarm(root, blob, chunk_size=args.chunk_mib * MiB, piece_size=size * 1024)
            for size in (64, 256, 1024, 4096)
        }
        for peers in (2, 3, 4):
            results.append(await measure(root, swarms[256], "loopback", peers, None, None))
        if netns:
            for peers in (2, 3, 4):
                with Lab(peers, args.rate_mbit) as lab:
                    results.append(await measure(root, swarms[256], "netns", peers, args.rate_mbit, lab))
            for piece_kib in (64, 1024, 4096):
                with Lab(4, args.rate_mbit) as lab:
                    results.append(await measure(root, swarms[piece_kib], "netns", 4, args.rate_mbit, lab))
    print_table(results, args)


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    chunks = f"chunks of {args.chunk_mib} MiB" if args.chunk_mib else "one chunk"
    print(
        f"blob {args.size_mib} MiB ({chunks}), SSL, TCP; netns links {args.rate_mbit} Mbit/s (tbf) each way"
    )
    print(f"{'where':<9} {'peers':>5} {'piece':>7} {'MB/s':>8} {'/link':>6} {'CPU s/GiB':>10}")
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        piece = f"{r.piece_kib}Ki"
        cpu = f"{r.cpu_per_gib:.2f}"
        print(f"{r.where:<9} {r.peers:>5} {piece:>7} {r.mbytes_per_s:>8.1f} {ratio:>6} {cpu:>10}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(1)
    finally:
        if os.geteuid() == 0:
            cleanup()
