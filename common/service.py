"""What every shoal binary does the same way: parse config, log JSON, run on uvloop, stop on signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import uvloop

from common.config import ConfigError
from common.logs import setup_logging

logger = logging.getLogger(__name__)


class HasLogLevel(Protocol):
    @property
    def log_level(self) -> str: ...


C = TypeVar("C", bound=HasLogLevel)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: `run` waits on it, then shuts down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def main_entry(
    prog: str,
    parse_args: Callable[[list[str]], C],
    run: Callable[[C], Coroutine[Any, Any, None]],
    argv: list[str] | None,
) -> None:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        sys.exit(f"{prog}: config: {exc}")
    setup_logging(config.log_level)
    try:
        uvloop.run(run(config))
    except (OSError, ValueError) as exc:
        logger.error("%s cannot start: %s", prog, exc)
        sys.exit(1)
