"""Announce (or join) throughput and latency of one tracker process, with thousands of simulated peers.

The tracker runs pinned to one core; `wrk` (Debian package `wrk`) generates the load from the other
core over HTTPS keep-alive connections, cycling through announces of PEERS simulated peers spread
over TORRENTS swarms (blob swarm ids), each with its own valid announce key. Reported: announces per
second, per tracker CPU-second, and latency percentiles.

With `--joins`, the load is joins instead: a real registry (Debian `docker-registry`, token auth)
holds BLOBS layers; every join is a new node (so each one writes the blob's state and gets a peer
certificate signed) with one of CREDENTIALS pull tokens. Each (credential, blob) pair joins once
before the measurement, so the registry `HEAD` is cached, as it is for a credential's later joins.

    python3 tests/bench/announce.py [--seconds 20] [--connections 64] [--peers 5000] [--torrents 100]
    python3 tests/bench/announce.py --joins [--seconds 20] [--connections 16] [--blobs 20] [--credentials 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote_from_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))  # `lab`

import aiohttp
from lab.images import push_image
from lab.pki import LOOPBACK, issue_server_files, new_lab_ca, write_ca
from lab.procstat import cpu_seconds
from lab.registry import Registry
from lab.services import Service, free_port, spawn_here, start_tracker
from lab.tokens import TokenIssuer

from common.certs import ca_from_pem, make_csr, new_key
from common.ids import Digest, NodeId
from tracker.announce import KEY_PARAM, AnnounceKeys
from tracker.ca import CA_FILE, announce_secret
from tracker.swarm import Member

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


NO_REGISTRY = {"host": "registry.invalid:5000", "url": "https://127.0.0.1:9"}


async def tracker(
    work: Path, port: int, registry: Mapping[str, object] = NO_REGISTRY
) -> tuple[Service, Path]:
    """A tracker pinned to core 0 (by default with no registry it could reach); its swarm CA file."""
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
                # Every simulated peer announces from the one loopback address.
                "peers_per_address": 1_000_000,
                "registries": [registry],
            }
        )
    )
    url = f"https://{LOOPBACK}:{port}"
    service = await start_tracker(config, url, ca_file, spawn=pinned_to_core_0, timeout=20)
    return service, work / "state" / CA_FILE


def announce_paths(ca_file: Path, peers: int, torrents: int) -> list[str]:
    """Each simulated peer announces one blob's swarm id, as nodes do (one announce per blob,
    whatever its number of chunk torrents)."""
    keys = AnnounceKeys(announce_secret(ca_from_pem(ca_file.read_bytes())))
    expires = int(time.time()) + 3600
    paths = []
    for i in range(peers):
        info_hash = Digest(hashlib.sha256(b"blob %d" % (i % torrents)).hexdigest()).swarm_id
        member = Member(NodeId.parse(f"node-{i}"), hashlib.sha256(b"key %d" % i).hexdigest())
        key = keys.sign(member, info_hash, expires)
        paths.append(
            f"/announce?{KEY_PARAM}={key}&info_hash={quote_from_bytes(info_hash.raw)}"
            f"&peer_id=-LT2110-{i:012d}&port={1024 + i % 64000}&uploaded=0&downloaded=0"
            f"&left={i % 2}&compact=1&numwant=50&event="
        )
    return paths


JOIN_SCRIPT = """
local templates = {%s}
local counter = 0
local run = "w"
failures = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) run = args[1] end
function request()
  counter = counter + 1
  local t = templates[(counter %% #templates) + 1]
  local headers = {["Authorization"] = t[2], ["Content-Type"] = "application/json"}
  return wrk.format("POST", t[1], headers, t[3] .. run .. "-" .. counter .. t[4])
end
function response(status, headers, body)
  if status ~= 200 then failures = failures + 1 end
end
""" + WRK_SCRIPT[WRK_SCRIPT.index("function done") :]


async def measure_announces(args: argparse.Namespace, work: Path) -> tuple[str, float]:
    port = free_port()
    service, ca_file = await tracker(work, port)
    try:
        paths = announce_paths(ca_file, args.peers, args.torrents)
        (work / "load.lua").write_text(WRK_SCRIPT % ",".join(json.dumps(p) for p in paths))
        # Warm-up: every simulated peer announces once, so the swarms are full.
        await asyncio.to_thread(run_wrk, work, port, 2, args.connections)
        cpu_before = cpu_seconds(service.pid)
        output = await asyncio.to_thread(run_wrk, work, port, args.seconds, args.connections)
        return output, cpu_seconds(service.pid) - cpu_before
    finally:
        await service.stop(timeout=10)


async def measure_joins(args: argparse.Namespace, work: Path) -> tuple[str, float]:
    issuer = TokenIssuer()
    # The registry only names its token realm in 401 answers; joins carry tokens already.
    async with Registry(work / "registry", new_lab_ca(), issuer, "https://127.0.0.1:9/token") as registry:
        layers = [hashlib.sha256(b"layer %d" % i).digest() * 2048 for i in range(args.blobs)]
        image = await push_image(registry, JOIN_REPO, layers)
        entry = {
            "host": registry.host, "url": registry.url, "ca": str(registry.ca_pem),
            "token": {"issuer": issuer.issuer_name, "service": issuer.service,
                      "certs": str(registry.certs_bundle)},
        }  # fmt: skip
        port = free_port()
        service, _ = await tracker(work, port, entry)
        try:
            templates = join_templates(registry.host, image.layer_digests, issuer, args.credentials)
            await warm_up(f"https://{LOOPBACK}:{port}", work / "ca.pem", templates)
            lua = ",".join("{" + ",".join(json.dumps(part) for part in t) + "}" for t in templates)
            (work / "load.lua").write_text(JOIN_SCRIPT % lua)
            cpu_before = cpu_seconds(service.pid)
            output = await asyncio.to_thread(run_wrk, work, port, args.seconds, args.connections, "m")
            return output, cpu_seconds(service.pid) - cpu_before
        finally:
            await service.stop(timeout=10)


JOIN_REPO = "bench/joins"


def join_templates(
    host: str, digests: Sequence[str], issuer: TokenIssuer, credentials: int
) -> list[tuple[str, str, str, str]]:
    """(path, Authorization, body before the node id, body after it) per (credential, blob)."""
    templates = []
    for i in range(credentials):
        token = "Bearer " + issuer.token({JOIN_REPO: ["pull"]}, subject=f"node-{i}", expires_in=3600)
        csr = make_csr(new_key())
        for digest in digests:
            body = json.dumps({"registry": host, "repository": JOIN_REPO, "csr": csr, "node": "@"})
            before, after = body.split('"@"')
            templates.append((f"/v1/blobs/{digest}/join", token, before + '"', '"' + after))
    return templates


async def warm_up(url: str, ca_file: Path, templates: Sequence[tuple[str, str, str, str]]) -> None:
    """One join per (credential, blob), so the registry's answer is cached for the measurement."""
    limit = asyncio.Semaphore(16)
    context = ssl.create_default_context(cafile=str(ca_file))

    async def one(session: aiohttp.ClientSession, index: int, template: tuple[str, str, str, str]) -> None:
        path, authorization, before, after = template
        async with limit, session.post(url + path, data=f"{before}warm-{index}{after}", ssl=context,
                                       headers={"Authorization": authorization}) as resp:  # fmt: skip
            if resp.status != 200:
                raise SystemExit(f"warm-up join answered {resp.status}: {await resp.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i, t) for i, t in enumerate(templates)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--joins", action="store_true", help="measure joins instead of announces")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--torrents", type=int, default=100)
    parser.add_argument("--blobs", type=int, default=20)
    parser.add_argument("--credentials", type=int, default=50)
    args = parser.parse_args()
    args.connections = args.connections or (16 if args.joins else 64)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        measure = measure_joins if args.joins else measure_announces
        output, cpu = asyncio.run(measure(args, Path(tmp)))
    report(output, cpu, args)


def run_wrk(work: Path, port: int, seconds: int, connections: int, *script_args: str) -> str:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
               "-s", str(work / "load.lua"), f"https://127.0.0.1:{port}", *(["--", *script_args] if
               script_args else [])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"wrk failed: {done.stdout}{done.stderr}")
    return done.stdout


def report(output: str, cpu: float, args: argparse.Namespace) -> None:
    total = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    failures = int(re.search(r"FAILURES (\d+)", output)[1])  # type: ignore[index]
    latency = {p: int(us) / 1000 for p, us in re.findall(r"LATENCY ([\d.]+) (\d+)", output)}
    what = "joins" if args.joins else "announces"
    load = {"blobs": args.blobs, "credentials": args.credentials} if args.joins else {
        "peers": args.peers, "torrents": args.torrents}  # fmt: skip
    result = {
        f"{what}_per_second": round(rate),
        f"{what}_per_cpu_second": round(total / cpu) if cpu else None,
        "tracker_cpu_seconds": round(cpu, 1),
        "latency_ms": latency,
        "failures": failures,
        **load,
        "connections": args.connections,
        "seconds": args.seconds,
    }
    print(f"{what + '/s':>12} {'per CPU-s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failures':>9}")
    print(f"{result[f'{what}_per_second']:>12} {result[f'{what}_per_cpu_second']:>10} "
          f"{latency.get('50', 0):>8.1f} {latency.get('99', 0):>8.1f} {failures:>9}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
