"""Announce throughput and latency of one tracker process, with thousands of simulated peers.

The tracker runs pinned to one core; `wrk` (Debian package `wrk`) generates the load from the other
core over HTTPS keep-alive connections, cycling through announces of PEERS simulated peers spread
over TORRENTS swarms, each with its own valid announce key. Reported: announces per second, per
tracker CPU-second, and latency percentiles.

    python3 tests/bench/announce.py [--seconds 20] [--connections 64] [--peers 5000] [--torrents 100]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote_from_bytes

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))  # `lab`

from lab.procstat import cpu_seconds

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_tracker(work: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(work / "tls.pem"))
    config = work / "tracker.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{port}",
                "public_url": f"https://127.0.0.1:{port}",
                "tls": {"cert": str(work / "tls.pem"), "key": str(work / "tls.pem")},
                "state_dir": str(work / "state"),
                "log_level": "warning",
                "registries": [{"host": "registry.invalid:5000", "url": "https://127.0.0.1:9"}],
            }
        )
    )
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "tracker", "--config", str(config)],
        cwd=Path(__file__).resolve().parents[2],
    )
    context = ssl.create_default_context(cafile=str(work / "ca.pem"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=1)
            return process, work / "state" / CA_FILE
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("tracker did not become healthy within 20 s")


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
        process, ca_file = start_tracker(work, port)
        try:
            paths = announce_paths(ca_file, args.peers, args.torrents)
            (work / "load.lua").write_text(WRK_SCRIPT % ",".join(json.dumps(p) for p in paths))
            # Warm-up: every simulated peer announces once, so the swarms are full.
            run_wrk(work, port, 2, args.connections)
            cpu_before = cpu_seconds(process.pid)
            output = run_wrk(work, port, args.seconds, args.connections)
            cpu = cpu_seconds(process.pid) - cpu_before
        finally:
            process.terminate()
            process.wait(10)
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
