"""Who may join a blob's swarm: the registry's own credential decides, never a shoal password.

Bearer tokens are verified locally (signature, issuer, audience, time, pull access) and then the
registry confirms, with the same credential, that the blob is in the repository asked for: a valid
token for repository A never opens a blob that only B holds. Basic credentials and anonymous joins
are decided by that HEAD alone. Positive answers are cached in memory (by a hash of the
credential, never the credential) for the token's lifetime, or `basic_auth_cache` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from common.ids import Digest, Repository
from common.tokens import InvalidToken, NoAccess, TokenVerifier
from tracker.config import RegistryConfig
from tracker.registry import BlobAnswer, BlobChecker

logger = logging.getLogger(__name__)

CACHE_LIMIT = 100_000


class Denied(Exception):
    def __init__(self, reason: str, status: int, message: str):
        super().__init__(message)
        self.reason = reason  # the label of shoal_tracker_join_denied_total
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Grant:
    size: int | None
    expires_at: float


class JoinAuthorizer:
    def __init__(
        self,
        checker: BlobChecker,
        verifiers: dict[str, TokenVerifier],
        basic_cache_seconds: float,
    ):
        self._checker = checker
        self._verifiers = verifiers
        self._basic_cache_seconds = basic_cache_seconds
        self._grants: dict[bytes, Grant] = {}

    async def authorize(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
    ) -> Grant:
        now = time.time()
        cache_key = _cache_key(registry, repository, digest, authorization)
        cached = self._grants.get(cache_key)
        if cached is not None and cached.expires_at > now:
            return cached
        expires_at = self._check_credential(registry, repository, authorization, now)
        grant = await self._ask_registry(registry, repository, digest, authorization, expires_at)
        if len(self._grants) >= CACHE_LIMIT:
            self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
        self._grants[cache_key] = grant
        return grant

    def _check_credential(
        self,
        registry: RegistryConfig,
        repository: Repository,
        authorization: str | None,
        now: float,
    ) -> float:
        """Until when a registry's "yes" for this credential may be reused."""
        scheme, _, credential = (authorization or "").partition(" ")
        if not credential:
            if registry.anonymous and not authorization:
                return now + self._basic_cache_seconds
            raise Denied("no_credential", 401, "a registry credential is required to join")
        if scheme.lower() == "basic":
            return now + self._basic_cache_seconds
        if scheme.lower() != "bearer":
            raise Denied("invalid_token", 401, "unsupported authorization scheme")
        verifier = self._verifiers.get(registry.host)
        if verifier is None:
            raise Denied("invalid_token", 401, "this registry is not configured for bearer tokens")
        try:
            token = verifier.verify(credential.strip(), repository, "pull")
        except InvalidToken:
            raise Denied("invalid_token", 401, "invalid token") from None
        except NoAccess:
            raise Denied("no_pull_access", 403, f"token does not grant pull on {repository}") from None
        return token.expires_at

    async def _ask_registry(
        self,
        registry: RegistryConfig,
        repository: Repository,
        digest: Digest,
        authorization: str | None,
        expires_at: float,
    ) -> Grant:
        answer, size = await self._checker.check_blob(registry, repository, digest, authorization)
        if answer is BlobAnswer.UNAUTHORIZED:
            raise Denied("invalid_token", 401, "the registry refused the credential")
        if answer is BlobAnswer.ABSENT:
            logger.info("blob %s is not in %s/%s for this credential", digest, registry.host, repository)
            raise Denied("not_in_repository", 403, f"{digest} is not in {repository}")
        return Grant(size=size, expires_at=expires_at)


def _cache_key(
    registry: RegistryConfig, repository: Repository, digest: Digest, authorization: str | None
) -> bytes:
    material = "\n".join([registry.host, str(repository), str(digest), authorization or ""])
    return hashlib.sha256(material.encode()).digest()
