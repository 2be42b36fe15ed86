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
import json
import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from lab import services
from lab.images import PushedImage, push_image, random_tar_layer
from lab.netns import TOOLS, Network, terminate
from lab.pki import AUTH_NAME, LOOPBACK, REGISTRY_NAME, issue_server_files, new_lab_ca, write_ca
from lab.procstat import cpu_seconds
from lab.registry import Registry
from lab.services import DOCKERD_TOOLS, Dockerd, Service, log_events, log_tail, read_metric, require_tools
from lab.token_server import User, write_config
from lab.tokens import TokenIssuer

REPO_ROOT = Path(__file__).resolve().parents[3]
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
LAB_TOOLS = {**TOOLS, **DOCKERD_TOOLS, "docker-registry": "docker-registry"}


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
    service: Service | None = field(default=None, repr=False)  # its shoal-node
    dockerd_service: Service | None = field(default=None, repr=False)

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
    def dockerd(self) -> Dockerd:
        return Dockerd(self.workdir, self.etc_docker, self.run_dir)

    @property
    def docker_host(self) -> str:
        return self.dockerd.host

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dockerd_log(self) -> str:
        return self.dockerd_log_path.read_text(errors="replace")

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of the node's /metrics; 0 when the node has not recorded it yet."""
        value, _ = await read_metric(self.admin_url, name, **labels)
        return 0.0 if value is None else value

    async def blob_bytes(self) -> dict[str, float]:
        """Layer bytes this node has served, by source: `p2p`, `upstream` (the registry), `cache`."""
        counters: dict[str, float] = (await self.status())["counters"]["shoal_blob_bytes_total"]
        return counters

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the running shoal-node process."""
        assert self.service is not None
        return cpu_seconds(self.service.pid)

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
        return await self.dockerd.docker(*args, stdin=stdin, timeout=timeout)

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
        self.ca = new_lab_ca()
        self.issuer = TokenIssuer()
        self.nodes: list[Node] = []
        self.tracker_url = ""  # from the root namespace; nodes use `tracker_public_url`
        self.tracker_public_url = f"https://{TRACKER_NAME}:{TRACKER_PORT}"
        self.realm = f"https://{AUTH_NAME}:{AUTH_PORT}/token"
        self._registry: Registry | None = None
        self._tracker: Service | None = None
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
    def tracker_config_path(self) -> Path:
        return self.workdir / "tracker" / "tracker.yaml"

    @property
    def tracker_log_path(self) -> Path:
        return self.tracker_config_path.with_suffix(".log")

    def tracker_log(self) -> str:
        return self.tracker_log_path.read_text(errors="replace")

    def tracker_events(self, event: str, **fields: str) -> list[dict[str, Any]]:
        """The tracker's structured log records of `event` (`join`, `lease`, `published`, ...)
        whose fields match `fields`, e.g. `tracker_events("join", node="node-1")`."""
        return log_events(self.tracker_log(), event, **fields)

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
        if self._tracker is not None:
            await self._tracker.kill()

    async def start_tracker(self) -> None:
        """Start the tracker again with the same config and state dir (CA and torrents survive)."""
        if self._tracker is not None and self._tracker.running():
            raise RuntimeError("the tracker is running")
        await self._start_tracker()

    async def kill_node(self, index: int) -> None:
        """SIGKILL `nodes[index]`'s shoal-node (its dockerd keeps running)."""
        service = self.nodes[index].service
        if service is not None:
            await service.kill()

    async def start_node(self, index: int) -> None:
        node = self.nodes[index]
        if node.service is not None and node.service.running():
            raise RuntimeError(f"{node.name} is running")
        await self._start_node(node)

    async def restart_node(self, index: int) -> None:
        """SIGKILL, then start again with the same config and cache dir."""
        await self.kill_node(index)
        await self.start_node(index)

    async def restart_dockerd(self, index: int, *, through_node: bool = True) -> None:
        """Stop `nodes[index]`'s dockerd and start it again, pulling through its shoal-node as the
        drop-in says, or (`through_node=False`) straight from the registry, as without shoal."""
        node = self.nodes[index]
        if node.dockerd_service is not None:
            await node.dockerd_service.stop(timeout=30)
        await self._start_dockerd(node, through_node=through_node)

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
        daemons = [n.dockerd_service.process for n in self.nodes if n.dockerd_service is not None]
        services = [n.service for n in self.nodes if n.service is not None]
        services += [self._tracker] if self._tracker is not None else []
        await asyncio.to_thread(terminate, daemons, 30)
        await asyncio.to_thread(terminate, [service.process for service in services])
        await self._stack.aclose()

    async def _start(self) -> None:
        net = self.network
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_ca(self.ca, self.ca_file)
        registry_dir = self.workdir / "registry"
        auth_tls = issue_server_files(self.ca, registry_dir, "auth", AUTH_NAME, net.ip("registry"), LOOPBACK)
        realm_config = write_config(
            registry_dir / "realm.json",
            self.issuer,
            auth_tls,
            USERS,
            listen=f"{net.ip('registry')}:{AUTH_PORT}",
        )
        realm_port = await net.forward("registry", AUTH_PORT, target=net.ip("registry"))
        registry_port = await net.forward("registry", REGISTRY_PORT, target=net.ip("registry"))
        self._registry = Registry(
            registry_dir, self.ca, self.issuer, self.realm, port=REGISTRY_PORT,
            startup_timeout=self.startup_timeout, listen_ip=net.ip("registry"),
            url=f"https://{LOOPBACK}:{registry_port}", spawn=net.spawner("registry"),
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

        async def start_realm() -> None:
            realm = await services.start_realm(
                realm_config, f"https://{LOOPBACK}:{realm_port}", self.ca_file,
                spawn=net.spawner("registry"), timeout=self.startup_timeout,
            )  # fmt: skip
            self._stack.push_async_exit(realm)

        starts = [
            self._stack.enter_async_context(self._registry),
            start_realm(),
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

    def _write_tracker_config(self) -> None:
        directory = self.workdir / "tracker"
        tls = issue_server_files(
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
        self.tracker_config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    async def _start_tracker(self) -> None:
        self._tracker = await services.start_tracker(
            self.tracker_config_path, self.tracker_url, self.ca_file,
            spawn=self.network.spawner("tracker"), timeout=self.startup_timeout,
        )  # fmt: skip

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
        node.service = await services.start_node(
            node.config_path, node.admin_url, spawn=self.network.spawner(node.name),
            name=f"shoal-node {node.name}", timeout=self.startup_timeout,
        )  # fmt: skip

    async def _start_dockerd(self, node: Node, *, through_node: bool = True) -> None:
        """dockerd in the node's network namespace, with the proxy environment operators install
        (`DOCKERD_DROP_IN`), or without a proxy, resolving the lab's names itself."""
        node.dockerd_service = await services.start_dockerd(
            node.dockerd, dockerd_environment() if through_node else {},
            netns=node.namespace, hosts=None if through_node else self.network.hosts_path(node.name),
            spawn=self.network.spawner(None), timeout=self.startup_timeout,
        )  # fmt: skip
