"""AIP-158 pagination: page sizes, opaque signed keyset page tokens bound to the caller,
and pages bounded by rows and by encoded bytes. Every paged QueryService method uses it.

A token carries the last key of the page it ends, written by the method's key schema
(a tuple of KeyKind), and a fingerprint of the caller (current_user()), the method and
the request's filters, signed with HMAC-SHA256. A token that was altered, that another
caller replays, that is reused with another method or other filters, or whose content
does not match the method's schema (bad JSON, wrong shape, a wrong-typed or out-of-range
value) is INVALID_ARGUMENT with a field violation on `page_token`, never INTERNAL.

fill_page builds every page: at most page_size rows and, past the first row, only while
the whole response's encoded size stays within the byte budget; a page that stops early
gets a next_page_token resuming right after its last row.
"""

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.message import Message

from services.common.auth import current_user
from services.common.convert import utc
from services.common.errors import FieldViolation, InvalidArgument

_SIGNATURE_BYTES = 16
_FINGERPRINT_CHARS = 32  # 128 bits of SHA-256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what the database columns hold


def resolve_page_size(requested: int, default: int, maximum: int) -> int:
    """0 means the default, above the maximum means the maximum, negative is an error."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", f"must be >= 0, got {requested}")])
    return min(requested or default, maximum)


@dataclass(frozen=True)
class KeyKind:
    """The type of one value of a keyset key: `dump` writes it into a token, `load` reads
    it back and raises TypeError or ValueError on anything `dump` cannot have written."""

    name: str
    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


def _load_int(value: Any) -> int:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise TypeError("expected a 64-bit integer")
    return value


def _load_text(value: Any) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise TypeError("expected a string without NUL characters")
    value.encode()  # a lone surrogate raises UnicodeEncodeError, a ValueError
    return value


def _load_uuid(value: Any) -> uuid.UUID:
    parsed = uuid.UUID(_load_text(value))
    if str(parsed) != value:
        raise ValueError("expected a UUID in canonical form")
    return parsed


def _load_time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_load_text(value))
    if parsed.tzinfo is None or parsed.isoformat() != value:
        raise ValueError("expected an ISO 8601 time with its UTC offset")
    return parsed


INT = KeyKind("integer", int, _load_int)
TEXT = KeyKind("string", str, _load_text)
UUID = KeyKind("uuid", str, _load_uuid)
TIMESTAMP = KeyKind("timestamp", lambda value: utc(value).isoformat(), _load_time)


class PageTokens:
    """The page tokens of one method, whose keyset key has the types `key`."""

    def __init__(self, secret: bytes, method: str, key: Sequence[KeyKind],
                 field: str = "page_token") -> None:
        """field: the request field that carries the tokens (named in violations)."""
        self._secret, self._method, self._key = secret, method, tuple(key)
        self._field = field

    def encode(self, filters: dict[str, Any], last_key: Sequence[Any]) -> str:
        """A token resuming after `last_key`, valid only for this caller, method and filters."""
        key = [kind.dump(value) for kind, value in zip(self._key, last_key, strict=True)]
        payload = json.dumps({"k": key, "f": self._fingerprint(filters)},
                             separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload + self._sign(payload)).decode().rstrip("=")

    def decode(self, token: str, filters: dict[str, Any]) -> tuple | None:
        """The typed last key in `token`, or None for an empty token (the first page)."""
        if not token:
            return None
        body = self._parse(self._verified(token))
        if body["f"] != self._fingerprint(filters):
            raise self._bad("token was issued for another caller, method or filters; "
                            "start again without it")
        return self._typed(body["k"])

    def _verified(self, token: str) -> bytes:
        """The signed payload of `token`."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise self._bad("malformed token") from exc
        payload, signature = raw[:-_SIGNATURE_BYTES], raw[-_SIGNATURE_BYTES:]
        if len(raw) <= _SIGNATURE_BYTES or not hmac.compare_digest(signature,
                                                                   self._sign(payload)):
            raise self._bad("token was not issued by this service or was altered")
        return payload

    def _typed(self, key: Any) -> tuple:
        expected = ", ".join(kind.name for kind in self._key)
        if not isinstance(key, list) or len(key) != len(self._key):
            raise self._bad(f"token key of {self._method} must be [{expected}]")
        try:
            return tuple(kind.load(value) for kind, value in zip(self._key, key, strict=True))
        except (TypeError, ValueError) as exc:
            raise self._bad(f"token key of {self._method} must be [{expected}]") from exc

    def _fingerprint(self, filters: dict[str, Any]) -> str:
        bound = {"user": current_user(), "method": self._method, "filters": filters}
        canonical = json.dumps(bound, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:_FINGERPRINT_CHARS]

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_SIGNATURE_BYTES]


    def _parse(self, payload: bytes) -> dict[str, Any]:
        """The token's JSON object {"k": key, "f": fingerprint}; anything else is refused."""
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise self._bad("token content is not valid") from exc
        if (not isinstance(body, dict) or set(body) != {"k", "f"}
                or not isinstance(body["f"], str)):
            raise self._bad("token content is not valid")
        return body

    def _bad(self, description: str) -> InvalidArgument:
        return InvalidArgument([FieldViolation(self._field, description)])


@dataclass(frozen=True)
class PageLimits:
    """What one page may hold: `rows` rows, and `bytes` encoded bytes of response."""

    rows: int
    bytes: int


def fill_page(response: Message, field: str, rows: Sequence[Any], limits: PageLimits,
              add: Callable[[Any, Any], Message], token_for: Callable[[Any], str]) -> None:
    """Adds rows to the repeated field `field` of `response` with add(container, row),
    which appends one message and returns it: at most limits.rows rows and, past the
    first, only while the whole response (what is set already included) stays within
    limits.bytes. When rows remain, next_page_token = token_for(last row added), with
    rows dropped from the end if the token itself would not fit. `rows` should hold
    limits.rows + 1 rows when there are more, so a full last page gets no token."""
    target = getattr(response, field)
    used, sizes = response.ByteSize(), []
    for row in rows[:limits.rows]:
        size = _framed(response, field, add(target, row).ByteSize())
        if sizes and used + size > limits.bytes:
            del target[-1]
            break
        used += size
        sizes.append(size)
    if len(sizes) < len(rows):
        _set_token(response, target, sizes, used, rows, limits.bytes, token_for)


def _set_token(response: Message, target: Any, sizes: list[int], used: int,
               rows: Sequence[Any], budget: int, token_for: Callable[[Any], str]) -> None:
    """Sets the token of the last row kept, dropping rows (never the first) until it fits."""
    while True:
        token = token_for(rows[len(sizes) - 1])
        if len(sizes) == 1 or used + _framed(response, "next_page_token", len(token)) <= budget:
            response.next_page_token = token
            return
        del target[-1]
        used -= sizes.pop()


def _framed(message: Message, field: str, size: int) -> int:
    """Encoded bytes of a length-delimited field of `size` bytes: tag, length, content."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    return _varint_bytes(number << 3) + _varint_bytes(size) + size


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
