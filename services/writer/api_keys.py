"""API keys: making them, hashing them, and the table they are kept in (writer.api_keys).

A key is KEY_PREFIX + 32 random bytes (urlsafe base64): 256 bits, so its hash cannot be
inverted and needs no slow KDF. Only the hash (HMAC-SHA-256 keyed with the writer's
api_key_pepper, or SHA-256 when no pepper is set) and the first PREFIX_CHARS characters are
stored; the key itself is returned once, by CreateApiKey.

Row-level security: listing, creating and revoking act for the caller (owner policy). The
exchange knows no user yet: it sets KEY_HASH_SETTING to the hash it computed, and the
table's exchange policies show it that one row only (migration 0004_api_keys).
"""

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.db import setting_transaction, user_transaction
from services.common.errors import NotFound, ResourceExhausted
from services.writer.models import api_keys_table

KEY_PREFIX = "elk_"
KEY_RANDOM_BYTES = 32
# urlsafe base64 of 32 bytes without padding.
KEY_CHARS = len(KEY_PREFIX) + 43
PREFIX_CHARS = len(KEY_PREFIX) + 8
# Must equal the setting the exchange policies of migration 0004_api_keys compare with.
KEY_HASH_SETTING = "epochlens.api_key_hash"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def looks_like_key(value: str) -> bool:
    """Whether `value` has the shape of a key (a cheap check before hashing)."""
    return len(value) == KEY_CHARS and value.startswith(KEY_PREFIX)


def hash_key(key: str, pepper: str | None) -> str:
    """Hex digest stored for `key`: HMAC-SHA-256 with the pepper, or SHA-256 without one."""
    data = key.encode()
    if pepper:
        return hmac.new(pepper.encode(), data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class ApiKeyRepository:
    """Statements on writer.api_keys, each in its own transaction."""

    def __init__(self, engine: AsyncEngine, max_per_user: int) -> None:
        self._engine = engine
        self._max_per_user = max_per_user

    async def create(self, user_id: str, name: str, key_hash: str, prefix: str,
                     expire_days: int) -> Row:
        """Stores a new key of user_id; RESOURCE_EXHAUSTED when the user already holds
        max_per_user keys that are not revoked."""
        now = datetime.now(UTC)
        values = {"id": uuid.uuid4(), "user_id": user_id, "name": name, "prefix": prefix,
                  "key_hash": key_hash, "create_time": now,
                  "expire_time": now + timedelta(days=expire_days) if expire_days else None}
        async with user_transaction(self._engine, user_id) as conn:
            held = await conn.scalar(select(func.count()).select_from(api_keys_table).where(
                api_keys_table.c.user_id == user_id, api_keys_table.c.revoke_time.is_(None)))
            if held >= self._max_per_user:
                raise ResourceExhausted(
                    f"user holds {held} API keys, the most allowed is {self._max_per_user}: "
                    "revoke one first (`epochlens keys revoke ID`)",
                    {"limit": "api_key_max_per_user", "held": str(held)})
            await conn.execute(api_keys_table.insert().values(values))
            return (await conn.execute(select(api_keys_table).where(
                api_keys_table.c.id == values["id"]))).one()

    async def list(self, user_id: str) -> list[Row]:
        """The user's keys that are not revoked, newest first."""
        async with user_transaction(self._engine, user_id) as conn:
            result = await conn.execute(select(api_keys_table).where(
                api_keys_table.c.user_id == user_id, api_keys_table.c.revoke_time.is_(None),
            ).order_by(api_keys_table.c.create_time.desc(), api_keys_table.c.id))
            return list(result)

    async def revoke(self, user_id: str, key_id: uuid.UUID) -> Row:
        """Sets revoke_time once; another user's key (or none) is NOT_FOUND."""
        owned = (api_keys_table.c.id == key_id, api_keys_table.c.user_id == user_id)
        async with user_transaction(self._engine, user_id) as conn:
            await conn.execute(update(api_keys_table).where(
                *owned, api_keys_table.c.revoke_time.is_(None)).values(
                revoke_time=datetime.now(UTC)))
            row = (await conn.execute(select(api_keys_table).where(*owned))).one_or_none()
        if row is None:
            raise NotFound(f"API key {key_id} not found", {"api_key_id": str(key_id)})
        return row

    async def use(self, key_hash: str) -> Row | None:
        """The key with this hash, its last_used_time stamped now; None when unknown."""
        now = datetime.now(UTC)
        async with setting_transaction(self._engine, KEY_HASH_SETTING, key_hash) as conn:
            row = (await conn.execute(select(api_keys_table).where(
                api_keys_table.c.key_hash == key_hash))).one_or_none()
            if row is not None and row.revoke_time is None:
                await conn.execute(update(api_keys_table).where(
                    api_keys_table.c.id == row.id).values(last_used_time=now))
            return row


