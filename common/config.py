"""Typed configuration from YAML: frozen dataclasses, validated once at start.

Every component declares its config as frozen dataclasses with defaults; `load_config` fills them
from a YAML mapping and fails with a `ConfigError` that names the key and the problem. Durations
are integer seconds or strings with a unit (`90s`, `10m`, `6h`, `7d`); sizes are integer bytes or
strings with a unit (`512MiB`, `50GiB`, `1GB`); addresses are `"ip:port"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from common.ids import is_decimal

T = TypeVar("T")

DURATION = "duration"
SIZE = "size"
ADDRESS = "address"
URL = "url"

Duration = Annotated[int, DURATION]
Size = Annotated[int, SIZE]
Address = Annotated[str, ADDRESS]
Url = Annotated[str, URL]

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class ConfigError(ValueError):
    """A configuration problem, phrased as `key: problem`."""


def parse_duration(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration such as 90s, 10m, 6h")
    if isinstance(value, int):
        seconds = value
    else:
        match = re.fullmatch(r"\s*([0-9]+)\s*([smhd]?)\s*", str(value))
        if not match:
            raise ValueError(f"expected seconds or a duration such as 90s, 10m, 6h, got {value!r}")
        seconds = int(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected bytes or a size such as 512MiB")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match[2].lower() not in _SIZE_UNITS:
            raise ValueError(f"expected bytes or a size such as 512MiB or 50GiB, got {value!r}")
        size = int(match[1]) * _SIZE_UNITS[match[2].lower()]
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_address(value: object) -> tuple[str, int]:
    """`"ip:port"` (IPv6 as `"[::1]:port"`) into host and port."""
    text = str(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'expected "ip:port", got {text!r}')
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'expected an IP address in "ip:port", got {host!r}') from None
    return host, int(port_text)


def parse_url(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s]*)?", text):
        raise ValueError(f"expected a full http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


_CONVERTERS = {
    DURATION: parse_duration,
    SIZE: parse_size,
    ADDRESS: lambda v: (parse_address(v), str(v))[1],
    URL: parse_url,
}


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return data


def load_config(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and bad values raise `ConfigError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        missing = re.search(r"'(\w+)'", str(exc))
        raise ConfigError(f"{prefix}{missing[1] if missing else '?'}: required") from None
    except ValueError as exc:  # a dataclass __post_init__ check
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def config_from_args(
    cls: type[T], argv: Sequence[str], *, prog: str, description: str | None, overrides: Mapping[str, str]
) -> T:
    """`--config FILE` plus one `--<key>` flag per `overrides` entry (key -> what it takes), which
    replaces that key of the file; then `load_config`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    for key, takes in overrides.items():
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f'override "{key}" ({takes})')
    args = parser.parse_args(argv)
    data = load_yaml(args.config)
    data |= {key: getattr(args, key) for key in overrides if getattr(args, key) is not None}
    return load_config(cls, data)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        _base, kind = typing.get_args(hint)
        if value is None:
            raise ConfigError(f"{key}: required")
        try:
            return _CONVERTERS[kind](value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(options[0], value, key)
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return tuple(_convert(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return load_config(hint, value, f"{key}.")  # type: ignore[arg-type]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer")
        return value
    if hint is str:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")
