"""A whole shoal cluster on one machine: registry, token realm, tracker, and N nodes with dockerd.

Each host is a network namespace of a `lab.netns.Network` (so every node has its own address, as
on a real cluster, and links can be rate-limited):

- `registry`: CNCF distribution with TLS and `auth: token` on `registry.shoal.test:5000`, and the
  token realm (`python -m lab.token_server`) on `https://auth.shoal.test:5001/token`;
- `tracker`: `python -m tracker` on `https://tracker.shoal.test:8443`, SQLite store;
- `node-<i>`: `python -m proxy` (listen 127.0.0.1:65001, admin 127.0.0.1:65002, peers on :6881)
  and its own dockerd, pointed at the node exactly as the README tells operators: the environment
  comes from `deploy/systemd/docker.service.d/shoal-node.conf`, so the lab and the docs agree.

Every TLS server has a certificate from one lab CA. Each dockerd trusts it for the registry host
(`certs.d/registry.shoal.test:5000/ca.crt`), which is how it verifies the token realm it reaches
through the node's tunnel; the node adds its own CA beside it. The root namespace reaches the
registry, the tracker and each node's admin endpoint through loopback forwards (`Network.forward`),
and each dockerd through its Unix socket.

    async with Cluster(nodes=2, rate="200mbit") as cluster:
        image = await cluster.push_image("team/app", [3_000_000, 2_000_000])
        await asyncio.gather(*(node.pull(cluster.reference(image)) for node in cluster.nodes))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lab.images import PushedImage, push_image, random_tar_layer
from lab.netns import Network, require_tools, terminate
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_cert, new_ca, write_ca
from lab.procstat import cpu_seconds
from lab.registry import Registry
from lab.token_server import User, write_config
from lab.tokens import TokenIssuer

REPO_ROOT = Path(__file__).resolve().parents[3]
LAB_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # deploy/local: lets children import `lab`
DOCKERD_DROP_IN = REPO_ROOT / "deploy/systemd/docker.service.d/shoal-node.conf"

TRACKER_NAME = "tracker.shoal.test"
REGISTRY_PORT = 5000
AUTH_PORT = 5001
TRACKER_PORT = 8443
NODE_LISTEN = "127.0.0.1:65001"
NODE_ADMIN_PORT = 65002
PEER_PORT = 6881

READER = ("reader", "reader-secret")
PUSHER = ("pusher", "pusher-secret")
TEAM_A = ("team-a", "team-a-secret")  # may pull team/a only
USERS = {
    READER[0]: User(READER[1], {"*": ["pull"]}),
    PUSHER[0]: User(PUSHER[1], {"*": ["pull", "push"]}),
    TEAM_A[0]: User(TEAM_A[1], {"team/a": ["pull"]}),
}
LAB_TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "containerd": "containerd",
    "docker-registry": "docker-registry",
}


def dockerd_environment(drop_in: Path = DOCKERD_DROP_IN) -> dict[str, str]:
    """The `Environment=` assignments of a systemd drop-in (quoted as systemd quotes them)."""
    env: dict[str, str] = {}
    for line in drop_in.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "Environment":
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                env[name] = setting
    if not env:
        raise RuntimeError(f"{drop_in}: no Environment= lines: how is dockerd pointed at the node?")
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({path}: {error})"


async def _wait(
    what: str,
    log: Path,
    process: subprocess.Popen[bytes],
    probe: Callable[[], Awaitable[bool]],
    timeout: float,
) -> None:
    """Poll `probe()` until it returns True; fail with the service's log tail if it exits or times
    out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; {log}:\n{log_tail(log)}")
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            if await probe():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not healthy after {timeout:.0f} s; {log}:\n{log_tail(log)}")
        await asyncio.sleep(0.1)


async def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, ssl=context or False) as resp,
    ):
        return resp.status == 200


async def admin_metric(admin_url: str, name: str, **labels: str) -> tuple[float | None, str]:
    """One sample of a node's /metrics (None when absent), and the whole text for messages."""
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value), text
    return None, text


@dataclass
class Node:
    """One lab node: a `shoal-node` and the dockerd that pulls through it."""

    cluster: Cluster = field(repr=False)
    name: str
    ip: str
    namespace: str
    workdir: Path
    run_dir: Path  # short: Unix socket paths are limited to 108 bytes
    admin_url: str = ""  # reachable from the root namespace (a loopback forward into the node)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    dockerd_process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "node.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def dockerd_log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def etc_docker(self) -> Path:
        """Bind-mounted on /etc/docker in dockerd's mount namespace."""
        return self.workdir / "etc-docker"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dockerd_log(self) -> str:
        return self.dockerd_log_path.read_text(errors="replace")

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of the node's /metrics; 0 when the node has not recorded it yet."""
        value, _ = await admin_metric(self.admin_url, name, **labels)
        return 0.0 if value is None else value

    async def blob_bytes(self) -> dict[str, float]:
        """Layer bytes this node has served, by source: `p2p`, `upstream` (the registry), `cache`."""
        counters: dict[str, float] = (await self.status())["counters"]["shoal_blob_bytes_total"]
        return counters

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the running shoal-node process."""
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    async def skopeo_copy(
        self,
        reference: str,
        *,
        through_node: bool = True,
        user: tuple[str, str] = READER,
        timeout: float = 900,
    ) -> None:
        """`skopeo copy` of `reference` to a scratch `oci:` layout inside the node's namespace
        (removed after), through the node as dockerd would go, or straight to the registry. Into
        `oci:` skopeo fetches the layers in parallel, as dockerd does (into `dir:` one by one)."""
        certs = self.etc_docker / "certs.d" / self.cluster.registry.host  # the lab CA and the node's
        destination = Path(tempfile.mkdtemp(prefix="skopeo-", dir=self.workdir))
        env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir)}
        if through_node:
            env |= dockerd_environment()
        argv = [
            "skopeo", "copy", "--quiet", "--src-creds", ":".join(user), "--src-cert-dir", str(certs),
            f"docker://{reference}", f"oci:{destination}:pulled",
        ]  # fmt: skip
        try:
            code, out = await self.cluster.network.arun(self.name, argv, timeout=timeout, env=env)
        finally:
            shutil.rmtree(destination, ignore_errors=True)
        if code != 0:
            raise RuntimeError(
                f"{self.name}: skopeo copy {reference} failed:\n{out}\n--- node:\n{log_tail(self.log_path)}"
            )

    async def status(self) -> Any:
        async with aiohttp.ClientSession() as session, session.get(f"{self.admin_url}/status") as response:
            return await response.json()

    async def docker(self, *args: str, stdin: bytes | None = None, timeout: float = 300) -> tuple[int, str]:
        """The docker CLI against this node's dockerd: (exit code, stdout and stderr)."""
        process = await asyncio.create_subprocess_exec(
            "docker", "-H", self.docker_host, *args,
            env={"PATH": os.environ["PATH"], "DOCKER_CONFIG": str(self.workdir / "client")},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(stdin), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace")

    async def login(self, user: tuple[str, str] = READER) -> tuple[int, str]:
        """`docker login` to the lab registry as one of the realm's `USERS`."""
        name, password = user
        registry = self.cluster.registry.host
        return await self.docker(
            "login", "--username", name, "--password-stdin", registry, stdin=password.encode()
        )

    async def pull(self, reference: str, user: tuple[str, str] = READER) -> str:
        """`docker login` as `user`, then `docker pull`; the pull's output."""
        code, out = await self.login(user)
        if code == 0:
            code, out = await self.docker("pull", reference)
        if code != 0:
            raise RuntimeError(
                f"{self.name}: docker pull {reference} failed:\n{out}\n--- dockerd:\n"
                f"{log_tail(self.dockerd_log_path)}\n--- node:\n{log_tail(self.log_path)}"
            )
        return out

    async def image_id(self, reference: str) -> str | None:
        code, out = await self.docker("image", "inspect", "--format", "{{.Id}}", reference)
        return out.strip() if code == 0 else None


class Cluster:
    """Started on entry (every service healthy), everything stopped and removed on exit."""

    def __init__(
        self,
        nodes: int = 2,
        *,
        rate: str | None = None,
        workdir: Path | None = None,
        node_options: Mapping[str, Any] | None = None,
        tracker_options: Mapping[str, Any] | None = None,
        startup_timeout: float = 60,
    ) -> None:
        if nodes < 1:
            raise ValueError("a lab needs at least one node")
        self.node_count = nodes
        self.rate = rate
        self.remove_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="shoal-lab-"))
        self.node_options = dict(node_options or {})
        self.tracker_options = dict(tracker_options or {})
        self.startup_timeout = startup_timeout
        self.node_names = [f"node-{i}" for i in range(1, nodes + 1)]
        self.network = Network(
            ["registry", "tracker", *self.node_names],
            rate=rate,
            aliases={"registry": [REGISTRY_NAME, AUTH_NAME], "tracker": [TRACKER_NAME]},
            workdir=self.workdir,
            remove_workdir=self.remove_workdir,
        )
        self.ca = new_ca()
        self.issuer = TokenIssuer()
        self.nodes: list[Node] = []
        self.tracker_url = ""  # from the root namespace; nodes use `tracker_public_url`
        self.tracker_public_url = f"https://{TRACKER_NAME}:{TRACKER_PORT}"
        self.realm = f"https://{AUTH_NAME}:{AUTH_PORT}/token"
        self._registry: Registry | None = None
        self._tracker: subprocess.Popen[bytes] | None = None
        self._stack = AsyncExitStack()

    # public helpers

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the cluster is not running")
        return self._registry

    @property
    def ca_file(self) -> Path:
        return self.workdir / "lab-ca.crt"

    @property
    def tracker_log_path(self) -> Path:
        return self.workdir / "tracker" / "tracker.log"

    def tracker_log(self) -> str:
        return self.tracker_log_path.read_text(errors="replace")

    def reference(self, image: PushedImage) -> str:
        return f"{self.registry.host}/{image.repo}:{image.tag}"

    async def push_image(
        self, repo: str, layer_sizes: Sequence[int], *, tag: str = "latest", seed: int | None = None
    ) -> PushedImage:
        """An image of random uncompressed tar layers of about these sizes, pushed from the root
        namespace over the registry forward (so pushing costs no lab bandwidth)."""
        base = seed if seed is not None else secrets.randbits(32)
        layers = await asyncio.to_thread(
            lambda: [random_tar_layer(size, seed=base + i) for i, size in enumerate(layer_sizes)]
        )
        return await push_image(self.registry, repo, layers, tag=tag)

    async def kill_tracker(self) -> None:
        if self._tracker is not None and self._tracker.poll() is None:
            self._tracker.kill()
            await asyncio.to_thread(self._tracker.wait)

    async def start_tracker(self) -> None:
        """Start the tracker again with the same config and state dir (CA and torrents survive)."""
        if self._tracker is not None and self._tracker.poll() is None:
            raise RuntimeError("the tracker is running")
        await self._start_tracker()

    async def kill_node(self, index: int) -> None:
        """SIGKILL `nodes[index]`'s shoal-node (its dockerd keeps running)."""
        process = self.nodes[index].process
        if process is not None and process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def start_node(self, index: int) -> None:
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"{node.name} is running")
        await self._start_node(node)

    async def restart_node(self, index: int) -> None:
        """SIGKILL, then start again with the same config and cache dir."""
        await self.kill_node(index)
        await self.start_node(index)

    # lifecycle

    async def __aenter__(self) -> Cluster:
        require_tools(LAB_TOOLS)
        try:
            await self._stack.enter_async_context(self.network)
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        """dockerds first (they hold no lab state), then nodes, tracker, realm and registry; the
        network's teardown then kills anything left and removes the namespaces."""
        daemons = [n.dockerd_process for n in self.nodes if n.dockerd_process is not None]
        nodes = [n.process for n in self.nodes if n.process is not None]
        await asyncio.to_thread(terminate, daemons, 30)
        await asyncio.to_thread(terminate, [*nodes, *([self._tracker] if self._tracker else [])])
        await self._stack.aclose()

    async def _start(self) -> None:
        net = self.network
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_ca(self.ca, self.ca_file)
        registry_dir = self.workdir / "registry"
        auth_tls = issue_server_cert(self.ca, registry_dir, "auth", AUTH_NAME, net.ip("registry"))
        realm_config = write_config(
            registry_dir / "realm.json",
            self.issuer,
            auth_tls,
            USERS,
            listen=f"{net.ip('registry')}:{AUTH_PORT}",
        )
        realm_log = registry_dir / "realm.log"
        realm = net.popen(
            "registry", [sys.executable, "-m", "lab.token_server", "--config", str(realm_config)],
            log=realm_log, env=self._python_env(), cwd=REPO_ROOT,
        )  # fmt: skip
        registry_port = await net.forward("registry", REGISTRY_PORT, target=net.ip("registry"))
        self._registry = Registry(
            registry_dir, self.ca, self.issuer, self.realm, port=REGISTRY_PORT,
            startup_timeout=self.startup_timeout, listen_ip=net.ip("registry"),
            url=f"https://{LOOPBACK}:{registry_port}", command_prefix=net.exec_prefix("registry"),
        )  # fmt: skip
        self.tracker_url = f"https://{LOOPBACK}:{await net.forward('tracker', TRACKER_PORT)}"
        self._write_tracker_config()
        for name in self.node_names:
            node = Node(
                self, name, net.ip(name), net.namespace(name), self.workdir / name, net.run_dir / name
            )
            node.admin_url = f"http://{LOOPBACK}:{await net.forward(name, NODE_ADMIN_PORT)}"
            self._write_node_files(node)
            self.nodes.append(node)

        async def realm_ready() -> bool:
            return "listening on" in realm_log.read_text(errors="replace")

        starts = [
            self._stack.enter_async_context(self._registry),
            _wait("token realm", realm_log, realm, realm_ready, self.startup_timeout),
            self._start_tracker(),
            *(self._start_node(node) for node in self.nodes),
            *(self._start_dockerd(node) for node in self.nodes),
        ]
        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels the other starts
                for start in starts:
                    group.create_task(start)
        except ExceptionGroup as errors:
            raise RuntimeError(
                "the lab did not start:\n\n" + "\n\n".join(map(str, errors.exceptions))
            ) from errors

    def _python_env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(LAB_PACKAGE_DIR), os.environ.get("PYTHONPATH")]))
        return os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}

    def _write_tracker_config(self) -> None:
        directory = self.workdir / "tracker"
        tls = issue_server_cert(
            self.ca, directory, "tracker", TRACKER_NAME, LOOPBACK, self.network.ip("tracker")
        )
        registry = self.registry
        config = {
            "listen": f"0.0.0.0:{TRACKER_PORT}",
            "public_url": self.tracker_public_url,
            "tls": {"cert": str(tls.cert), "key": str(tls.key)},
            "state_dir": str(directory / "state"),
            "store": "sqlite",
            "registries": [
                {
                    "host": registry.host,
                    "url": f"https://{registry.host}",
                    "ca": str(self.ca_file),
                    "token": {
                        "issuer": registry.issuer_name,
                        "service": registry.service,
                        "certs": str(registry.certs_bundle),
                    },
                }
            ],
        } | self.tracker_options
        (directory / "tracker.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML

    async def _start_tracker(self) -> None:
        log = self.tracker_log_path
        self._tracker = self.network.popen(
            "tracker", [sys.executable, "-m", "tracker", "--config", str(log.with_suffix(".yaml"))],
            log=log, env=self._python_env(), cwd=REPO_ROOT,
        )  # fmt: skip
        context = ssl.create_default_context(cafile=str(self.ca_file))

        async def healthy() -> bool:
            return await _http_ok(f"{self.tracker_url}/healthz", context)

        await _wait("shoal-tracker", log, self._tracker, healthy, self.startup_timeout)

    def _write_node_files(self, node: Node) -> None:
        node.run_dir.mkdir(parents=True, exist_ok=True)
        certs = node.etc_docker / "certs.d" / self.registry.host
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca_file, certs / "ca.crt")  # the operator's trust: verifies the token realm
        config = {
            "listen": NODE_LISTEN,
            "admin": f"127.0.0.1:{NODE_ADMIN_PORT}",
            "peer_listen": f"0.0.0.0:{PEER_PORT}",
            "tracker": self.tracker_public_url,
            "tracker_ca": str(self.ca_file),
            "node_id": node.name,
            "cache_dir": str(node.cache_dir),
            "docker_certs_dir": str(node.etc_docker / "certs.d"),
            "shutdown_grace": 5,
            "registries": [{"host": self.registry.host, "ca": str(self.ca_file)}],
        } | self.node_options
        node.config_path.write_text(json.dumps(config, indent=2))

    async def _start_node(self, node: Node) -> None:
        node.process = self.network.popen(
            node.name, [sys.executable, "-m", "proxy", "--config", str(node.config_path)],
            log=node.log_path, env=self._python_env(), cwd=REPO_ROOT,
        )  # fmt: skip

        async def healthy() -> bool:
            return await _http_ok(f"{node.admin_url}/healthz")

        await _wait(f"shoal-node {node.name}", node.log_path, node.process, healthy, self.startup_timeout)

    async def _start_dockerd(self, node: Node) -> None:
        """dockerd in the node's network namespace and a mount namespace of its own, where the
        node's `etc-docker` is /etc/docker (dockerd reads trust only from /etc/docker/certs.d).
        Not under `ip netns exec`: that remounts /sys, which hides the cgroup mounts dockerd needs."""
        prefix = [
            "unshare", "--mount", "--propagation", "private",
            "nsenter", f"--net=/run/netns/{node.namespace}",
            "sh", "-c", 'mount --bind "$0" /etc/docker && exec "$@"', str(node.etc_docker),
        ]  # fmt: skip
        argv = [
            "dockerd", "--host", node.docker_host, "--data-root", str(node.workdir / "docker"),
            "--exec-root", str(node.run_dir / "exec"), "--pidfile", str(node.run_dir / "dockerd.pid"),
            "--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
        ]  # fmt: skip
        env = {"PATH": os.environ["PATH"], **dockerd_environment()}
        node.dockerd_process = self.network.popen(
            None, argv, prefix=prefix, log=node.dockerd_log_path, env=env
        )

        async def healthy() -> bool:
            return (await node.docker("version", timeout=10))[0] == 0

        await _wait(
            f"dockerd of {node.name}",
            node.dockerd_log_path,
            node.dockerd_process,
            healthy,
            self.startup_timeout,
        )
