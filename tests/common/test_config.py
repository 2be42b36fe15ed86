from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import (
    Address,
    ConfigError,
    Duration,
    Size,
    load_config,
    load_yaml,
    parse_address,
    parse_duration,
    parse_size,
)


@dataclass(frozen=True)
class Inner:
    url: str
    insecure: bool = False


@dataclass(frozen=True)
class Outer:
    inners: tuple[Inner, ...]
    listen: Address = "127.0.0.1:1"
    timeout: Duration = 10
    size: Size = 1
    path: Path | None = None


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("10m", 600), ("6h", 21600), ("2d", 172800)]
)
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [(5, 5), ("512MiB", 512 << 20), ("50GiB", 50 << 30), ("1GB", 10**9)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10x", "-1", "1.5h", True, ""])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        # Arabic-Indic 3 and 80, superscript 2, fullwidth 1
        (parse_duration, "\u0663s"), (parse_duration, "\u00b2"),
        (parse_size, "\u0663MiB"), (parse_size, "\uff11GB"),
        (parse_address, "127.0.0.1:\u0668\u0660"), (parse_address, "127.0.0.1:\u00b2"),
    ],
)  # fmt: skip
def test_digits_are_ascii_only(parse: Callable[[object], object], text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse(text)


def test_load_fills_nested_dataclasses() -> None:
    config = load_config(
        Outer, {"inners": [{"url": "u", "insecure": True}], "timeout": "1m", "size": "1KiB", "path": "/x"}
    )
    assert config == Outer((Inner("u", True),), timeout=60, size=1024, path=Path("/x"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inners": [], "bogus": 1}, "bogus: unknown key"),
        ({}, "inners: required"),
        ({"inners": [{"insecure": True}]}, "inners[0].url: required"),
        ({"inners": [{"url": "u", "insecure": "yes"}]}, "inners[0].insecure: expected true or false"),
        ({"inners": [], "listen": "localhost:80"}, "listen: expected an IP address"),
        ({"inners": [], "timeout": "soon"}, "timeout: expected seconds"),
        ({"inners": {}}, "inners: expected a list"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(Outer, data)


def test_yaml_errors_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
