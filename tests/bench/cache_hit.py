"""Cache hits through one node against the registry straight, with the same client, on loopback.

A real registry (TLS, token auth), its token realm, a tracker and one `shoal-node` run on
loopback. An image of LAYERS random layers (SIZE MiB in all) is pushed, and one pull through the
node warms its cache (the node is the origin: it fetches each layer, verifies and publishes it).
Then each client pulls the layers once each way untimed, and RUNS times through the node and
RUNS times from the registry straight, alternating which goes first:

- `curl`: one HTTP/1.1 connection, a bearer token, every layer GET in turn to /dev/null; through
  the node with `--proxy`. The client costs little, so this measures the server side.
- `curl-par`: the same with one curl per layer, all at once, as dockerd downloads layers in
  parallel: node (or registry) and clients then saturate the CPUs.
- `skopeo`: `skopeo copy docker://... dir:` (a Go registry client, layers in parallel, digests
  verified, files written to a tmpfs), the same command with and without `HTTPS_PROXY`. It runs
  with a private /etc/hosts naming the registry, so it needs root.

Every through-node run must have been served from the node's cache
(`shoal_blob_bytes_total{source="cache"}` grows by the layer bytes), or the benchmark fails.
Reported: median MB/s of layer bytes over the client's wall time, each run's MB/s, CPU seconds
per GiB of layer bytes of the node, the registry and the client, and how busy the rest of the
machine was; then the ratio of the through-node median to the direct one (target >= 0.9).
Nothing is pinned: node, registry and client share the machine's cores. Everything is stopped
and removed on exit, also after a failure or Ctrl-C.

    python3 tests/bench/cache_hit.py [--size-mib 768] [--layers 4] [--runs 5] [--clients curl,curl-par,skopeo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))  # `lab`
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.images import PushedImage, push_image, random_tar_layer
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_files, new_lab_ca
from lab.procstat import cpu_seconds, machine_busy_seconds
from lab.registry import Registry
from lab.token_server import TokenServer
from lab.tokens import TokenIssuer

from tests.conftest import USERS
from tests.proxy.harness import RunningNode
from tests.proxy.test_p2p import swarm_node, tracker_entry, wait_seeding
from tests.tracker.harness import run_tracker, tracker_config

REPO = "bench/app"
CREDS = "reader:" + USERS["reader"].password
MiB = 2**20
GiB = 2**30
CLIENT_TIMEOUT = 600.0
PUBLISH_TIMEOUT = 120.0
CLIENTS = ("curl", "curl-par", "skopeo")


@dataclass
class Sample:
    seconds: float
    node_cpu: float
    registry_cpu: float
    client_cpu: float
    machine_cpu: float  # every process on the machine, ours included


@dataclass
class Series:
    client: str
    path: str  # "node" or "direct"
    samples: list[Sample] = field(default_factory=list)

    def rates(self, size: int) -> list[float]:
        return [size / s.seconds / 1e6 for s in self.samples]

    def median_rate(self, size: int) -> float:
        return statistics.median(self.rates(size))

    def others(self) -> float:
        """Median cores that the rest of the machine kept busy during a run: other load is noise."""
        return statistics.median(
            (s.machine_cpu - s.node_cpu - s.registry_cpu - s.client_cpu) / s.seconds for s in self.samples
        )

    def cpu_per_gib(self, size: int, which: str) -> float:
        return float(statistics.median(getattr(s, which) for s in self.samples)) / (size / GiB)


def children_cpu() -> float:
    """CPU of reaped children: the client, the only child that exits during a measurement."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(
        self, work: Path, registry: Registry, node: RunningNode, image: PushedImage, layer_bytes: int
    ) -> None:
        self.work = work
        self.registry = registry
        self.node = node
        self.image = image
        self.layer_bytes = layer_bytes
        self.registry_pid = registry.pid  # what the CPU column reads
        self.certs = work / "skopeo-certs"  # registry CA and node CA, as a docker certs.d dir
        self.certs.mkdir()
        shutil.copy(registry.ca_pem, self.certs / "registry.crt")
        shutil.copy(node.ca_file(registry.host), self.certs / "node.crt")
        self.hosts = work / "hosts"
        self.hosts.write_text(f"127.0.0.1 localhost\n{LOOPBACK} {REGISTRY_NAME}\n")
        shm = Path("/dev/shm")
        self.scratch = Path(tempfile.mkdtemp(prefix="shoal-bench-", dir=shm if shm.is_dir() else work))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def commands(self, client: str, through_node: bool, dest: Path) -> list[list[str]]:
        """The client processes of one pull, run at the same time."""
        if client == "curl":
            return [self.curl(through_node, self.image.layer_digests)]
        if client == "curl-par":
            return [self.curl(through_node, [digest]) for digest in self.image.layer_digests]
        return [self.skopeo(dest)]

    def curl(self, through_node: bool, digests: Sequence[str]) -> list[str]:
        token = self.registry.issuer.token({REPO: ["pull"]}, subject="reader")
        base = f"https://{self.registry.host}/v2/{REPO}/blobs/"
        if through_node:
            route = ["--proxy", self.node.proxy_url, "--cacert", str(self.node.ca_file(self.registry.host))]
        else:
            route = ["--resolve", f"{self.registry.host}:{LOOPBACK}", "--cacert", str(self.registry.ca_pem)]
        command = ["curl", "--http1.1", "--silent", "--show-error", "--fail", *route,
                   "--header", f"Authorization: Bearer {token}"]  # fmt: skip
        for digest in digests:
            command += ["--output", "/dev/null", base + digest]
        return command

    def skopeo(self, dest: Path) -> list[str]:
        ref = f"docker://{self.registry.host}/{REPO}:{self.image.tag}"
        copy = ["skopeo", "copy", "--src-cert-dir", str(self.certs), "--src-creds", CREDS, ref, f"dir:{dest}"]
        # A private mount namespace whose /etc/hosts names the registry; through the node the name
        # is resolved by the node (HTTPS_PROXY), so both runs are the same command.
        wrapper = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, str(self.hosts), *copy]

    async def pull(self, client: str, through_node: bool) -> Sample:
        dest = self.scratch / "copy"
        commands = self.commands(client, through_node, dest)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if through_node and client == "skopeo":
            env["HTTPS_PROXY"] = self.node.proxy_url
        cached = await self.node.metric("shoal_blob_bytes_total", source="cache")
        node_cpu, registry_cpu = cpu_seconds(self.node.process.pid), cpu_seconds(self.registry_pid)
        client_cpu, busy = children_cpu(), machine_busy_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(run_client(command, env) for command in commands))
        seconds = time.perf_counter() - started
        sample = Sample(
            seconds,
            cpu_seconds(self.node.process.pid) - node_cpu,
            cpu_seconds(self.registry_pid) - registry_cpu,
            children_cpu() - client_cpu,
            machine_busy_seconds() - busy,
        )
        if client == "skopeo":
            self.check_copy(dest)
            shutil.rmtree(dest)
        served = await self.node.metric("shoal_blob_bytes_total", source="cache") - cached
        if served != (self.layer_bytes if through_node else 0):
            raise SystemExit(
                f"{client} {'through the node' if through_node else 'direct'}: the node's cache served "
                f"{served:.0f} bytes, expected {self.layer_bytes if through_node else 0}: not a cache-hit "
                f"measurement\n{self.node.log()[-4000:]}"
            )
        return sample

    def check_copy(self, dest: Path) -> None:
        sizes = sum((dest / d.removeprefix("sha256:")).stat().st_size for d in self.image.layer_digests)
        if sizes != self.layer_bytes:
            raise SystemExit(f"skopeo wrote {sizes} layer bytes, expected {self.layer_bytes}")


async def run_client(command: Sequence[str], env: dict[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode:
        raise SystemExit(f"{command[0]} failed ({process.returncode}): {err.decode(errors='replace')}")


async def measure(args: argparse.Namespace, work: Path, clients: list[str]) -> tuple[list[Series], int]:
    ca = new_lab_ca()
    issuer = TokenIssuer()
    auth_tls = issue_server_files(ca, work / "auth", "auth", AUTH_NAME, REGISTRY_NAME, LOOPBACK)
    each = args.size_mib * MiB // args.layers
    async with (
        TokenServer(issuer, auth_tls, USERS) as realm,
        Registry(work / "registry", ca, issuer, realm.realm) as registry,
    ):
        image = await push_image(registry, REPO, [random_tar_layer(each, seed=i) for i in range(args.layers)])
        layer_bytes = sum(layer["size"] for layer in json.loads(image.manifest)["layers"])
        tracker_ca = new_lab_ca()
        config = tracker_config(work, tracker_ca, [tracker_entry(registry)], log_level="warning")
        async with (
            run_tracker(work, tracker_ca, config) as tracker,
            swarm_node(work, registry, tracker.url, tracker.ca_file, "bench-node", log_level="info") as node,
        ):
            bench = Bench(work, registry, node, image, layer_bytes)
            try:
                # The first pull makes the node origin of every layer; once published they are cached.
                await run_client(bench.curl(True, image.layer_digests), {"PATH": "/usr/bin:/bin"})
                await wait_seeding(node, args.layers, PUBLISH_TIMEOUT)
                for client in clients:  # untimed: a client's first run is slower, whichever path
                    for through_node in (True, False):
                        await bench.pull(client, through_node)
                series = {(c, p): Series(c, p) for c in clients for p in ("node", "direct")}
                for run in range(args.runs):
                    for client in clients:
                        for path in ("node", "direct") if run % 2 == 0 else ("direct", "node"):
                            sample = await bench.pull(client, through_node=path == "node")
                            series[client, path].samples.append(sample)
            finally:
                bench.close()
    return list(series.values()), layer_bytes


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    tools = []
    for command in (["curl", "--version"], ["skopeo", "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        tools.append(done.stdout.splitlines()[0].split(" (")[0] if done.stdout else command[0])
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}; "
        f"{', '.join(tools)}; node, registry and client unpinned on the same CPUs, all on loopback"
    )


def print_table(results: list[Series], size: int, args: argparse.Namespace) -> None:
    print(f"{args.layers} layers, {size / MiB:.0f} MiB of layer bytes, served from the node's cache; "
          f"{args.runs} runs each; MB/s = layer bytes / client wall time")  # fmt: skip
    print(machine())
    header = (f"{'client':<8} {'path':<6} {'MB/s':>6}  {'runs MB/s':<24} "
              f"{'node':>6} {'registry':>8} {'client':>6}  {'others':>6}")  # fmt: skip
    print(header)
    for s in results:
        runs = " ".join(f"{r:.0f}" for r in s.rates(size))
        print(f"{s.client:<8} {s.path:<6} {s.median_rate(size):>6.0f}  {runs:<24} "
              f"{s.cpu_per_gib(size, 'node_cpu'):>6.2f} {s.cpu_per_gib(size, 'registry_cpu'):>8.2f} "
              f"{s.cpu_per_gib(size, 'client_cpu'):>6.2f}  {s.others():>6.2f}")  # fmt: skip
    print("node, registry, client: median CPU s per GiB of layer bytes; others: median cores busy "
          "with anything else on the machine (tracker, other workloads): high means a noisy run")  # fmt: skip
    by = {(s.client, s.path): s for s in results}
    for client in dict.fromkeys(s.client for s in results):
        ratio = by[client, "node"].median_rate(size) / by[client, "direct"].median_rate(size)
        verdict = "ok" if ratio >= 0.9 else "BELOW TARGET"
        print(f"{client}: through node / direct = {ratio:.2f} (target >= 0.9: {verdict})")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=768, help="layer bytes in all")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of the default")
    args = parser.parse_args()
    if not 0 < args.size_mib < args.layers * 256:
        parser.error("--size-mib: under 256 MiB per layer (random_tar_layer's limit)")
    clients = [c for c in args.clients.split(",") if c]
    if not clients or set(clients) - set(CLIENTS):
        parser.error(f"--clients: from {', '.join(CLIENTS)}")
    for tool in ("curl", "skopeo") if "skopeo" in clients else ("curl",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")
    if "skopeo" in clients and os.geteuid() != 0:
        raise SystemExit("skopeo runs with a private /etc/hosts, which needs root: or pass --clients curl")
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM unwinds like Ctrl-C: processes stopped, temporary files removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        results, size = await measure(args, Path(tmp), clients)
    print_table(results, size, args)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(1)
