"""A whole cluster's network on one machine: one network namespace per host, one switch.

Layout of lab `<id>` (names are `shoal-<id>-<host>`; addresses `10.77.<id>.0/24`):

    shoal-<id>-registry   eth0 10.77.<id>.2  ─┐
    shoal-<id>-tracker    eth0 10.77.<id>.3  ─┼─ veth ─ bridge `br0` in shoal-<id>-switch
    shoal-<id>-node-1     eth0 10.77.<id>.4  ─┘
    ...

Why it is built this way:

- The bridge lives in its own "switch" namespace and each veth pair is created with one end in the
  host's namespace and the other in the switch's, so no interface, address or route is ever added
  to the root namespace: the machine's own network is untouched, and two labs cannot collide on
  interface names (every host's end is `eth0`, every switch port is named after its host).
- The lab id is claimed by creating the switch namespace (`ip netns add` fails if it exists), so two
  labs started at once, or leftovers of a crashed one, never share names or addresses.
- A rate limit is a `tbf` qdisc on both ends of every link: on the host's `eth0` it limits what the
  host sends, on its switch port what the host receives. The registry's link is limited too, so the
  registry is a host like any other (as in a real cluster), and pulling S bytes takes at least S/B.
  The kernel here has no `netem`, so links have a rate but no added delay.
- `/etc/netns/<ns>/hosts` gives every host the lab's names: `ip netns exec` bind-mounts it on
  /etc/hosts for the programs it starts. Names matter: Go clients skip the proxy for `localhost`
  and loopback literals, and TLS is verified for `registry.shoal.test`, not for an address.
- Processes started with `popen` are recorded, and teardown also kills whatever is still inside a
  lab namespace (`ip netns pids`), so nothing outlives the lab even if a caller lost a handle.
- The root namespace reaches services inside the lab only through `forward`: a loopback port whose
  connections are opened from inside the host's namespace (a socket keeps the namespace it was
  created in; a thread that entered the namespace creates it). Nothing is routed into the lab.
- Who owns a lab is written to `/run/shoal-lab/<id>/owner.json` (pid, work dir), so
  `cleanup_stale()` removes only labs whose owner process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from lab.services import Spawn, require_tools, run_command, spawn_here

logger = logging.getLogger(__name__)

PREFIX = "shoal-"
RUN_ROOT = Path("/run/shoal-lab")  # owner files and short Unix socket paths (tmpfs, < 108 bytes)
ETC_NETNS = Path("/etc/netns")
NETNS_DIR = Path("/run/netns")
SWITCH = "switch"
MAX_LABS = 256  # the third octet of 10.77.<id>.0/24
CLONE_NEWNET = 0x40000000
TOOLS = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux", "nsenter": "util-linux"}


def rate_bytes(rate: str) -> int:
    """tc rate syntax (`200mbit`, `1gbit`, `500kbit`) in bytes per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.strip().lower())
    if match is None:
        raise ValueError(f"rate {rate!r}: expected a number with kbit, mbit or gbit, e.g. 200mbit")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match[2]]
    return int(float(match[1]) * scale) // 8


def tbf_args(rate: str) -> list[str]:
    """tbf needs a bucket of at least one (GSO) packet and ~10 ms of traffic to reach its rate; a
    queue of 50 ms keeps TCP from seeing drops as its window grows."""
    burst = max(rate_bytes(rate) // 100, 64 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    names = _run(["ip", "netns", "list"], check=False).stdout.split()
    return [name for name in names if name.startswith(prefix)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    for _ in range(50):
        pids = [int(p) for p in _run(["ip", "netns", "pids", namespace], check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise RuntimeError(f"processes in {namespace} survive SIGKILL")


def _remove_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    _run(["ip", "netns", "delete", namespace], check=False)
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


def _remove_etc_netns_if_empty() -> None:
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only when empty: another tool's namespaces may have files there


def _owner(lab_id: int) -> dict[str, Any] | None:
    try:
        owner: dict[str, Any] = json.loads((RUN_ROOT / str(lab_id) / "owner.json").read_text())
    except (OSError, ValueError):
        return None
    return owner


def _lab_id(namespace: str) -> int | None:
    match = re.match(rf"{re.escape(PREFIX)}(\d+)-", namespace)
    return int(match[1]) if match else None


def cleanup_stale() -> list[str]:
    """Remove what labs whose owner process is gone left behind: their processes, namespaces,
    /etc/netns dirs, run dirs and (if the lab made it) work dir. Returns the namespaces removed."""
    ids = {_lab_id(ns) for ns in list_namespaces()}
    ids |= {_lab_id(path.name) for path in ETC_NETNS.glob(f"{PREFIX}*")}
    ids |= {int(path.name) for path in RUN_ROOT.glob("*") if path.name.isdigit()}
    removed: list[str] = []
    for lab_id in sorted(i for i in ids if i is not None):
        owner = _owner(lab_id)
        if owner is not None and owner.get("pid") != os.getpid() and _alive(int(owner["pid"])):
            continue
        if owner is None and (RUN_ROOT / str(lab_id)).exists() and _claimed_recently(lab_id):
            continue  # being set up right now by another process
        prefix = f"{PREFIX}{lab_id}-"
        for namespace in list_namespaces(prefix):
            _remove_namespace(namespace)
            removed.append(namespace)
        for path in ETC_NETNS.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)
        if owner is not None and owner.get("remove_workdir"):
            shutil.rmtree(owner["workdir"], ignore_errors=True)
        shutil.rmtree(RUN_ROOT / str(lab_id), ignore_errors=True)
    _remove_etc_netns_if_empty()
    return removed


def _claimed_recently(lab_id: int, seconds: float = 30) -> bool:
    try:
        return time.time() - (RUN_ROOT / str(lab_id)).stat().st_mtime < seconds
    except OSError:
        return False


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def socket_in(namespace_path: Path) -> socket.socket:
    """A TCP socket in another network namespace. setns changes only the calling thread, which is
    moved back before returning; the socket stays in the namespace it was created in."""
    with open("/proc/thread-self/ns/net") as home, open(namespace_path) as target:
        _setns(target.fileno())
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(home.fileno())


class Network:
    """Namespaces, links, names and rate limits for `hosts`; torn down on exit, SIGTERM or error.

    `aliases` maps a host to the DNS names it answers to in every host's /etc/hosts (each host is
    also known by its own name). `rate` is a tc rate such as `200mbit`, or None for no limit.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        *,
        rate: str | None = None,
        aliases: Mapping[str, Sequence[str]] | None = None,
        workdir: Path,
        remove_workdir: bool = False,
    ) -> None:
        if len(set(hosts)) != len(hosts) or SWITCH in hosts or len(hosts) > 250:
            raise ValueError(f"at most 250 unique host names, none {SWITCH!r}: {hosts}")
        if rate is not None:
            rate_bytes(rate)
        self.hosts = list(hosts)
        self.rate = rate
        self.aliases = {host: list(names) for host, names in (aliases or {}).items()}
        self.workdir = workdir
        self.remove_workdir = remove_workdir
        self.lab_id = -1
        self._processes: list[subprocess.Popen[bytes]] = []
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._sigterm_installed = False

    # names and addresses

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.lab_id}-{host}"

    def ip(self, host: str) -> str:
        return f"10.77.{self.lab_id}.{self._host_number(host)}"

    def _host_number(self, host: str) -> int:
        return 2 + self.hosts.index(host)  # .1 is left for a gateway the lab does not need

    @property
    def run_dir(self) -> Path:
        """Per-lab directory for short paths (Unix sockets must stay under 108 bytes)."""
        return RUN_ROOT / str(self.lab_id)

    def hosts_path(self, host: str) -> Path:
        """The host's /etc/hosts (`ip netns exec` bind-mounts it for the commands it starts)."""
        return ETC_NETNS / self.namespace(host) / "hosts"

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [" ".join([self.ip(host), host, *self.aliases.get(host, [])]) for host in self.hosts]
        return "\n".join(lines) + "\n"

    # running things inside a host

    def exec_prefix(self, host: str) -> list[str]:
        """`ip netns exec NS`: the host's network and its /etc/hosts (in a mount namespace of its
        own that ip makes for the command, which also remounts /sys: fine except for dockerd)."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def run(self, host: str, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run to completion inside `host`; output captured as text."""
        return _run([*self.exec_prefix(host), *argv], check=check)

    async def arun(
        self, host: str, argv: Sequence[str], *, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        """Like `run`, without blocking the event loop: (exit code, stdout and stderr)."""
        return await run_command([*self.exec_prefix(host), *argv], env=env, timeout=timeout)

    def popen(
        self, host: str | None, argv: Sequence[str], *, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host` (None: as it is, for a command that enters the namespace
        itself), output appended to `log`; the lab stops it at teardown if nobody did before."""
        process = spawn_here([*(self.exec_prefix(host) if host else []), *argv], log=log, env=env)
        self._processes.append(process)
        return process

    def spawner(self, host: str | None) -> Spawn:
        """A `lab.services.Spawn` that starts services inside `host` (see `popen`)."""
        return functools.partial(self.popen, host)

    async def forward(self, host: str, port: int, *, target: str = "127.0.0.1") -> int:
        """A port on the root namespace's loopback that reaches `target:port` as seen from inside
        `host` (its own loopback by default). Returns the local port; closed at teardown."""
        path = NETNS_DIR / self.namespace(host)
        loop = asyncio.get_running_loop()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(2**16):
                    writer.write(data)
                    await writer.drain()
            with contextlib.suppress(ConnectionError, OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                sock = await asyncio.to_thread(socket_in, path)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (target, port))
                except OSError:
                    sock.close()
                    return
                reader, writer = await asyncio.open_connection(sock=sock)
                try:
                    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))
                finally:
                    writer.close()
            finally:
                client_writer.close()
                self._connections.discard(task)

        server = await asyncio.start_server(connect, "127.0.0.1", 0)
        self._servers.append(server)
        local_port: int = server.sockets[0].getsockname()[1]
        return local_port

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Everything `popen` started (running or not)."""
        return list(self._processes)

    # lifecycle

    async def __aenter__(self) -> Network:
        require_tools(TOOLS)
        await asyncio.to_thread(cleanup_stale)
        try:
            await asyncio.to_thread(self._build)
        except BaseException:
            await self._aclose()
            raise
        self._catch_sigterm()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._aclose()

    def _catch_sigterm(self) -> None:
        """SIGTERM cancels the task that entered the lab, so its `async with` blocks unwind and the
        lab is torn down (SIGINT already does this under `asyncio.run`)."""
        task = asyncio.current_task()
        if task is None:
            return
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            self._sigterm_installed = True

    async def _aclose(self) -> None:
        if self._sigterm_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            self._sigterm_installed = False
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self._servers.clear()
        # Synchronous on purpose: a second Ctrl-C must not cut the teardown short half-way.
        self.close()

    def _claim_id(self) -> None:
        """The first free id whose switch namespace we manage to create is ours."""
        for lab_id in range(MAX_LABS):
            try:
                (RUN_ROOT / str(lab_id)).mkdir(parents=True)
            except FileExistsError:
                continue
            self.lab_id = lab_id
            if _run(["ip", "netns", "add", self.namespace(SWITCH)], check=False).returncode == 0:
                owner = {
                    "pid": os.getpid(),
                    "workdir": str(self.workdir),
                    "remove_workdir": self.remove_workdir,
                }
                (self.run_dir / "owner.json").write_text(json.dumps(owner))
                return
            (RUN_ROOT / str(lab_id)).rmdir()
        self.lab_id = -1
        raise RuntimeError(
            f"no free lab id: {MAX_LABS} labs exist (python -m lab cleanup removes stale ones)"
        )

    def _build(self) -> None:
        self._claim_id()
        switch = self.namespace(SWITCH)
        _run(["ip", "-n", switch, "link", "set", "lo", "up"])
        _run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", switch, "link", "set", "br0", "up"])
        hosts_file = self.hosts_file()
        for host in self.hosts:
            namespace = self.namespace(host)
            self.hosts_path(host).parent.mkdir(parents=True, exist_ok=True)
            self.hosts_path(host).write_text(hosts_file)
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            # One end in the host, the other in the switch: nothing appears in the root namespace.
            _run(["ip", "-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", host,
                  "netns", switch])  # fmt: skip
            _run(["ip", "-n", switch, "link", "set", host, "master", "br0", "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0"])
            _run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
            if self.rate is not None:
                _run(["tc", "-n", namespace, "qdisc", "add", "dev", "eth0", "root", *tbf_args(self.rate)])
                _run(["tc", "-n", switch, "qdisc", "add", "dev", host, "root", *tbf_args(self.rate)])
        logger.info("lab %d: %s on 10.77.%d.0/24", self.lab_id, ", ".join(self.hosts), self.lab_id)

    def close(self) -> None:
        """Stop every process, then remove namespaces (their veths go with them), /etc/netns dirs,
        the run dir and, if the lab made it, the work dir. Safe to call twice."""
        terminate(self._processes)
        self._processes.clear()
        if self.lab_id < 0:
            return
        for host in [*self.hosts, SWITCH]:
            _remove_namespace(self.namespace(host))
        _remove_etc_netns_if_empty()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN_ROOT.rmdir()  # only when no other lab is running
        self.lab_id = -1


def terminate(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """SIGTERM to all at once, then SIGKILL what has not exited by `timeout`."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
