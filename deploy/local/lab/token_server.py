"""A token realm implementing the docker token protocol for the test registry.

`GET /token?service=S&scope=repository:NAME:pull,push` with optional HTTP Basic auth answers
`{"token", "access_token", "expires_in"}` (https://distribution.github.io/distribution/spec/auth/token/).
The token grants the intersection of what was asked and what the user (or, without credentials,
the "anonymous" entry) is configured for; bad credentials get 401.

In process: `async with TokenServer(issuer, tls, users) as server: server.realm`.
As a process (the lab): `python -m lab.token_server --config FILE`, where FILE is written by
`write_config`; `lab.services.start_realm` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from lab.pki import ServerCert, server_context
from lab.tokens import TokenIssuer

ANY = "*"


@dataclass(frozen=True)
class User:
    password: str
    access: Mapping[str, Sequence[str]]  # repo (or "*") -> actions (or ["*"])


@dataclass(frozen=True)
class Realm:
    users: Mapping[str, User] = field(default_factory=dict)
    anonymous: Mapping[str, Sequence[str]] = field(default_factory=dict)
    expires_in: int = 300


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:name:pull,push` -> ("repository", "name", ["pull", "push"])."""
    kind, _, rest = scope.partition(":")
    name, sep, actions = rest.rpartition(":")
    if not kind or not sep or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def grant(allowed: Mapping[str, Sequence[str]], scopes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Requested repository actions that `allowed` permits; repositories with none are left out."""
    granted: list[tuple[str, list[str]]] = []
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed is None or parsed[0] != "repository":
            continue
        _, repo, wanted = parsed
        permitted = allowed.get(repo, allowed.get(ANY, ()))
        actions = [a for a in wanted if ANY in permitted or a in permitted]
        if actions:
            granted.append((repo, actions))
    return granted


def parse_basic(header: str) -> tuple[str, str] | None:
    """RFC 7617 `Basic base64(user:password)`; None when malformed."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _unauthorized(message: str) -> web.Response:
    body = {"errors": [{"code": "UNAUTHORIZED", "message": message}]}
    return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Basic realm="shoal-test"'})


def make_app(issuer: TokenIssuer, realm: Realm) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        service = request.query.get("service")
        if service is not None and service != issuer.service:
            body = {"errors": [{"code": "DENIED", "message": f"unknown service {service!r}"}]}
            return web.json_response(body, status=400)
        subject = "anonymous"
        allowed = realm.anonymous
        header = request.headers.get("Authorization")
        if header is not None:
            creds = parse_basic(header)
            if creds is None:
                return _unauthorized("malformed credentials")
            user = realm.users.get(creds[0])
            if user is None or user.password != creds[1]:
                return _unauthorized("invalid username or password")
            subject, allowed = creds[0], user.access
        access = grant(allowed, request.query.getall("scope", []))
        jwt = issuer.token(access, subject=subject, expires_in=realm.expires_in)
        return web.json_response({"token": jwt, "access_token": jwt, "expires_in": realm.expires_in})

    app = web.Application()
    app.router.add_get("/token", token)
    return app


class TokenServer:
    """The realm on `host:port` (port 0: a free one) over HTTPS; `url` and `realm` once entered."""

    def __init__(
        self,
        issuer: TokenIssuer,
        tls: ServerCert,
        users: Mapping[str, User] | None = None,
        anonymous: Mapping[str, Sequence[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        expires_in: int = 300,
    ) -> None:
        self.issuer = issuer
        self.tls = tls
        self.config = Realm(users or {}, anonymous or {}, expires_in)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    async def __aenter__(self) -> TokenServer:
        self._runner = web.AppRunner(make_app(self.issuer, self.config), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=server_context(self.tls))
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def write_config(
    path: Path,
    issuer: TokenIssuer,
    tls: ServerCert,
    users: Mapping[str, User] | None = None,
    anonymous: Mapping[str, Sequence[str]] | None = None,
    *,
    listen: str = "127.0.0.1:0",
    expires_in: int = 300,
) -> Path:
    """The JSON config for `python -m lab.token_server`; the signing key goes beside it."""
    key = issuer.write_key(path.with_name(path.stem + "-signing.key"))
    cert = issuer.write_bundle(path.with_name(path.stem + "-signing.crt"))
    config = {
        "listen": listen,
        "tls": {"cert": str(tls.cert), "key": str(tls.key)},
        "signing": {"key": str(key), "cert": str(cert)},
        "issuer": issuer.issuer_name,
        "service": issuer.service,
        "expires_in": expires_in,
        "users": {
            name: {"password": u.password, "access": {r: list(a) for r, a in u.access.items()}}
            for name, u in (users or {}).items()
        },
        "anonymous": {r: list(a) for r, a in (anonymous or {}).items()},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def load_config(path: Path) -> TokenServer:
    raw = json.loads(path.read_text())
    issuer = TokenIssuer.load(
        Path(raw["signing"]["key"]),
        Path(raw["signing"]["cert"]),
        issuer_name=raw["issuer"],
        service=raw["service"],
    )
    host, _, port = raw["listen"].rpartition(":")
    users = {name: User(u["password"], u["access"]) for name, u in raw["users"].items()}
    return TokenServer(
        issuer,
        ServerCert(cert=Path(raw["tls"]["cert"]), key=Path(raw["tls"]["key"])),
        users,
        raw["anonymous"],
        host=host,
        port=int(port),
        expires_in=int(raw["expires_in"]),
    )


async def serve(config: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with load_config(config) as server:
        print(f"listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.token_server")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.config))


if __name__ == "__main__":
    main()
