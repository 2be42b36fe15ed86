"""Announce throughput and latency of one tracker process, with thousands of simulated peers.

The tracker runs pinned to one core; `wrk` (Debian package `wrk`) generates the load from the other
core over HTTPS keep-alive connections, cycling through announces of PEERS simulated peers spread
over TORRENTS swarms, each with its own valid announce key. Reported: announces per second, per
tracker CPU-second, and latency percentiles.

    python3 tests/bench/announce.py [--seconds 20] [--connections 64] [--peers 5000] [--torrents 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote_from_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))  # `lab`

from lab.pki import LOOPBACK, issue_server_files, new_lab_ca, write_ca
from lab.procstat import cpu_seconds
from lab.services import Service, free_port, spawn_here, start_tracker

from common.certs import ca_from_pem
from common.ids import InfoHash, NodeId
from tracker.announce import KEY_PARAM, AnnounceKeys
from tracker.ca import CA_FILE, announce_secret

WRK_SCRIPT = """
local paths = {%s}
local counter = 0
failures = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end
function response(status, headers, body)
  if status ~= 200 or string.find(body, "failure reason", 1, true) then failures = failures + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("failures") end
  io.write(string.format("FAILURES %%d\\n", total))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("LATENCY %%g %%d\\n", p, latency:percentile(p)))
  end
end
"""


def pinned_to_core_0(argv: Sequence[str], *, log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return spawn_here(["taskset", "-c", "0", *argv], log=log, env=env)


def tracker(work: Path, port: int) -> tuple[Service, Path]:
    """A tracker pinned to core 0 with no registry it could reach; its swarm CA file."""
    ca = new_lab_ca()
    ca_file = write_ca(ca, work / "ca.pem")
    tls = issue_server_files(ca, work, "tls", LOOPBACK)
    config = work / "tracker.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": f"{LOOPBACK}:{port}",
                "public_url": f"https://{LOOPBACK}:{port}",
                "tls": {"cert": str(tls.cert), "key": str(tls.key)},
                "state_dir": str(work / "state"),
                "log_level": "warning",
                "registries": [{"host": "registry.invalid:5000", "url": "https://127.0.0.1:9"}],
            }
        )
    )
    url = f"https://{LOOPBACK}:{port}"
    service = asyncio.run(start_tracker(config, url, ca_file, spawn=pinned_to_core_0, timeout=20))
    return service, work / "state" / CA_FILE


def announce_paths(ca_file: Path, peers: int, torrents: int) -> list[str]:
    keys = AnnounceKeys(announce_secret(ca_from_pem(ca_file.read_bytes())))
    expires = int(time.time()) + 3600
    paths = []
    for i in range(peers):
        info_hash = InfoHash((i % torrents).to_bytes(20, "big"))
        key = keys.sign(NodeId.parse(f"node-{i}"), info_hash, expires)
        paths.append(
            f"/announce?{KEY_PARAM}={key}&info_hash={quote_from_bytes(info_hash.raw)}"
            f"&peer_id=-LT2110-{i:012d}&port={6881 + i % 1000}&uploaded=0&downloaded=0"
            f"&left={i % 2}&compact=1&numwant=50&event="
        )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--torrents", type=int, default=100)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        service, ca_file = tracker(work, port)
        try:
            paths = announce_paths(ca_file, args.peers, args.torrents)
            (work / "load.lua").write_text(WRK_SCRIPT % ",".join(json.dumps(p) for p in paths))
            # Warm-up: every simulated peer announces once, so the swarms are full.
            run_wrk(work, port, 2, args.connections)
            cpu_before = cpu_seconds(service.pid)
            output = run_wrk(work, port, args.seconds, args.connections)
            cpu = cpu_seconds(service.pid) - cpu_before
        finally:
            asyncio.run(service.stop(timeout=10))
    report(output, cpu, args)


def run_wrk(work: Path, port: int, seconds: int, connections: int) -> str:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
               "-s", str(work / "load.lua"), f"https://127.0.0.1:{port}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"wrk failed: {done.stdout}{done.stderr}")
    return done.stdout


def report(output: str, cpu: float, args: argparse.Namespace) -> None:
    total = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    failures = int(re.search(r"FAILURES (\d+)", output)[1])  # type: ignore[index]
    latency = {p: int(us) / 1000 for p, us in re.findall(r"LATENCY ([\d.]+) (\d+)", output)}
    result = {
        "announces_per_second": round(rate),
        "announces_per_cpu_second": round(total / cpu) if cpu else None,
        "tracker_cpu_seconds": round(cpu, 1),
        "latency_ms": latency,
        "failures": failures,
        "peers": args.peers,
        "torrents": args.torrents,
        "connections": args.connections,
        "seconds": args.seconds,
    }
    print(f"{'announces/s':>12} {'per CPU-s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failures':>9}")
    print(f"{result['announces_per_second']:>12} {result['announces_per_cpu_second']:>10} "
          f"{latency.get('50', 0):>8.1f} {latency.get('99', 0):>8.1f} {failures:>9}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
