"""The systemd units in deploy/systemd, checked offline by systemd's own tools.

Nothing here needs systemd as PID 1. `systemd-analyze verify` also checks that ExecStart names an
executable, so the units are verified in a scratch root (`--root`) that holds them, systemd's own
units, and the console scripts pip installed for this python, at the path of the README's venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from common.config import load_config, load_yaml, parse_address
from proxy.config import NodeConfig
from tracker.config import TrackerConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
NODE = "shoal-node.service"
TRACKER = "shoal-tracker.service"
UNITS = (NODE, TRACKER)
SYSUSERS = "deploy/systemd/sysusers.d/shoal-tracker.conf"
# A regression guard, not a target: on systemd 252 the node scores 1.5 and the tracker 1.1 (the
# units as they were before hardening: 9.2 and 8.5).
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} not found: apt-get install systemd"
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def settings(unit: str) -> dict[str, list[str]]:
    """Every value of every key, sections merged: the keys read here occur in one section only."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def setting(unit: str, key: str) -> str:
    (value,) = settings(unit)[key]
    return value


def install_section() -> str:
    return (ROOT / "README.md").read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]


def readme_venv() -> Path:
    venvs = re.findall(r"python3 -m venv (\S+)", install_section())
    assert len(venvs) == 1, f"README's Install section should create one venv, found {venvs}"
    return Path(venvs[0])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    scripts = Path(sysconfig.get_path("scripts"))
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, root / "etc/systemd/system")
        executable = Path(setting(unit, "ExecStart").split()[0])
        script = scripts / executable.name
        assert script.is_file(), f"{script} missing: pip install -e . into this python"
        (root / executable.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(script, root / executable.relative_to("/"))
    return root


def verify(root: Path) -> list[str]:
    """What `systemd-analyze verify` says about our units (it exits 0 on unknown keys)."""
    result = run(tool("systemd-analyze"), "verify", f"--root={root}", *UNITS)
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if any(unit in line for unit in UNITS)]
    assert result.returncode == 0 or ours, lines
    return ours


def test_units_verify_clean(root: Path) -> None:
    assert verify(root) == []


def test_verify_reports_a_typo(root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "root"
    shutil.copytree(root, broken, symlinks=True)
    unit = broken / "etc/systemd/system" / NODE
    unit.write_text(unit.read_text().replace("\nProtectClock=", "\nProtectClok="))
    assert any("Unknown key 'ProtectClok'" in line for line in verify(broken))


@pytest.mark.parametrize("unit", UNITS)
def test_exposure(root: Path, unit: str) -> None:
    result = run(tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}", unit)
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_units_run_what_readme_installs(unit: str) -> None:
    executable, flag, config = setting(unit, "ExecStart").split()
    daemon = unit.removesuffix(".service")
    assert Path(executable) == readme_venv() / "bin" / daemon
    assert flag == "--config"
    assert f"deploy/config/{daemon.removeprefix('shoal-')}.yaml {config}" in install_section()
    assert f"deploy/systemd/{unit} /etc/systemd/system/" in install_section()


def test_sysusers_creates_the_tracker_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run(tool("systemd-sysusers"), f"--root={tmp_path}", "--dry-run", str(ROOT / SYSUSERS))
    assert result.returncode == 0, result.stderr
    assert f"Creating user '{setting(TRACKER, 'User')}'" in result.stderr
    assert f"Creating group '{setting(TRACKER, 'Group')}'" in result.stderr
    assert f"{SYSUSERS} /etc/sysusers.d/" in install_section()
    assert "\nsystemd-sysusers" in install_section()


def test_node_unit_matches_node_yaml() -> None:
    config = load_config(NodeConfig, load_yaml(ROOT / "deploy/config/node.yaml"))
    assert config.cache_dir == Path("/var/lib") / setting(NODE, "StateDirectory")
    assert str(config.docker_certs_dir) in setting(NODE, "ReadWritePaths").split()
    # No capabilities: every port must be unprivileged.
    assert setting(NODE, "CapabilityBoundingSet") == ""
    for address in (config.listen, config.admin, config.peer_listen):
        assert parse_address(address)[1] >= 1024, address


def test_tracker_unit_matches_tracker_yaml() -> None:
    config = load_config(TrackerConfig, load_yaml(ROOT / "deploy/config/tracker.yaml"))
    assert config.state_dir == Path("/var/lib") / setting(TRACKER, "StateDirectory")
    assert setting(TRACKER, "CapabilityBoundingSet") == ""
    assert parse_address(config.listen)[1] >= 1024
