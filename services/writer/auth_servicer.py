"""AuthService: per-user API keys and their exchange for short-lived tokens.

CreateApiKey, ListApiKeys and RevokeApiKey act for the caller of a verified token.
ExchangeApiKey is the one method the interceptor lets through without a token
(services.common.interceptors.TOKENLESS_METHODS): the key is the credential. Every failed
exchange is logged with its client address and counted; an address with
api_key_max_failures failures within api_key_failure_window_s gets RESOURCE_EXHAUSTED
until its oldest failure leaves the window.
"""

import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from epochlens.v1 import auth_pb2, auth_pb2_grpc
from services.common.auth import current_user, mint_token_expiring, signing_unavailable
from services.common.config import AuthSettings
from services.common.convert import timestamp
from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from services.writer.api_keys import (
    PREFIX_CHARS,
    ApiKeyRepository,
    hash_key,
    looks_like_key,
    new_key,
    utc,
)
from services.writer.config import WriterSettings

log = logging.getLogger(__name__)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# Addresses with recent failures kept before the stale ones are dropped (bounds the memory an
# attacker with many addresses can make the writer hold).
MAX_TRACKED_ADDRESSES = 10_000


def key_to_proto(row) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        id=str(row.id), user_id=row.user_id, name=row.name, prefix=row.prefix,
        create_time=timestamp(row.create_time), expire_time=timestamp(row.expire_time),
        revoke_time=timestamp(row.revoke_time), last_used_time=timestamp(row.last_used_time))


class FailedExchanges:
    """Failed exchanges per client address within a sliding window."""

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._times: defaultdict[str, deque[float]] = defaultdict(deque)
        self.total = 0

    def _recent(self, address: str) -> deque[float]:
        times = self._times[address]
        horizon = time.monotonic() - self._window_s
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._times[address]
        return times

    def check(self, address: str) -> None:
        """RESOURCE_EXHAUSTED when the address used up its failures in the window."""
        times = self._recent(address)
        if len(times) >= self._limit:
            retry_s = max(0.0, times[0] + self._window_s - time.monotonic())
            raise ResourceExhausted(
                f"too many failed API key exchanges from this address ({len(times)} in "
                f"{self._window_s:g}s): retry in {retry_s:.0f}s",
                {"limit": "api_key_max_failures", "retry_after_s": f"{retry_s:.0f}"})

    def add(self, address: str) -> int:
        """Records a failure; returns the address's failures within the window."""
        self.total += 1
        if len(self._times) >= MAX_TRACKED_ADDRESSES:
            self._prune()
        times = self._times[address]
        times.append(time.monotonic())
        return len(times)

    def _prune(self) -> None:
        """Drops the addresses whose failures all left the window."""
        before = len(self._times)
        for address in list(self._times):
            self._recent(address)
        log.info("failed API key exchanges: %d of %d tracked addresses had no failure left in "
                 "the window and were dropped", before - len(self._times), before)


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The peer's host without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or "unknown"
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, repository: ApiKeyRepository, settings: WriterSettings,
                 auth: AuthSettings) -> None:
        self._repo = repository
        self._settings = settings
        self._auth = auth
        pepper = settings.api_key_pepper
        self._pepper = pepper.get_secret_value() if pepper is not None else None
        self._failures = FailedExchanges(settings.api_key_max_failures,
                                         settings.api_key_failure_window_s)
        self.counts: Counter[str] = Counter()
        self._cannot_sign = signing_unavailable(auth)
        if self._cannot_sign:
            log.warning("ExchangeApiKey will be refused (FAILED_PRECONDITION): %s; set it on "
                        "the writer to let clients exchange API keys", self._cannot_sign)

    async def CreateApiKey(self, request: auth_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.CreateApiKeyResponse:
        self._check_create(request)
        key = new_key()
        row = await self._repo.create(current_user(), request.name,
                                      hash_key(key, self._pepper), key[:PREFIX_CHARS],
                                      request.expire_days)
        self.counts["created"] += 1
        log.info("API key %s (%s) created by %s", row.id, row.prefix, row.user_id)
        return auth_pb2.CreateApiKeyResponse(api_key=key_to_proto(row), secret=key)

    def _check_create(self, request: auth_pb2.CreateApiKeyRequest) -> None:
        violations = []
        if len(request.name) > self._settings.max_name_chars:
            violations.append(FieldViolation(
                "name", f"longer than {self._settings.max_name_chars} characters"))
        if not 0 <= request.expire_days <= self._settings.api_key_max_days:
            violations.append(FieldViolation(
                "expire_days", f"must be 0 (no expiry) to {self._settings.api_key_max_days}"))
        if violations:
            raise InvalidArgument(violations)

    async def ListApiKeys(self, request: auth_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> auth_pb2.ListApiKeysResponse:
        rows = await self._repo.list(current_user())
        return auth_pb2.ListApiKeysResponse(api_keys=[key_to_proto(row) for row in rows])

    async def RevokeApiKey(self, request: auth_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> auth_pb2.ApiKey:
        try:
            key_id = uuid.UUID(request.id)
        except ValueError:
            raise InvalidArgument([FieldViolation(
                "id", f"not an API key id (expected a UUID): {request.id[:64]!r}")]) from None
        row = await self._repo.revoke(current_user(), key_id)
        self.counts["revoked"] += 1
        log.info("API key %s (%s) of %s revoked", row.id, row.prefix, row.user_id)
        return key_to_proto(row)

    async def ExchangeApiKey(self, request: auth_pb2.ExchangeApiKeyRequest,
                             context: grpc.aio.ServicerContext
                             ) -> auth_pb2.ExchangeApiKeyResponse:
        if self._cannot_sign:
            raise FailedPrecondition(f"this writer cannot sign tokens: {self._cannot_sign}",
                                     {"cause": "cannot_sign"})
        address = client_address(context)
        self._failures.check(address)
        try:
            row = await self._usable_key(request.api_key)
        except Unauthenticated as exc:
            failures = self._failures.add(address)
            log.warning("API key exchange refused for %s: %s (%d failures from this address "
                        "in the window, %d in all)", address, exc.message, failures,
                        self._failures.total)
            raise
        token, exp = mint_token_expiring(self._auth, row.user_id, self._settings.api_token_ttl_s)
        self.counts["exchanged"] += 1
        expire = timestamp_pb2.Timestamp(seconds=exp)
        return auth_pb2.ExchangeApiKeyResponse(access_token=token, expire_time=expire,
                                               user_id=row.user_id)

    async def _usable_key(self, api_key: str):
        """The key's row; UNAUTHENTICATED (with the cause) when it cannot be used."""
        if not looks_like_key(api_key):
            raise Unauthenticated("malformed API key (expected the key `epochlens keys "
                                  "create` printed)", {"cause": "malformed"})
        row = await self._repo.use(hash_key(api_key, self._pepper))
        if row is None:
            raise Unauthenticated("unknown API key", {"cause": "unknown"})
        if row.revoke_time is not None:
            raise Unauthenticated(f"API key {row.prefix}... was revoked at "
                                  f"{utc(row.revoke_time).isoformat()}", {"cause": "revoked"})
        expire = utc(row.expire_time)
        if expire is not None and expire <= datetime.now(UTC):
            raise Unauthenticated(f"API key {row.prefix}... expired at {expire.isoformat()}",
                                  {"cause": "expired"})
        return row
