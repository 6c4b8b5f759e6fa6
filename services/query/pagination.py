"""AIP-158 pagination: page sizes and opaque, signed keyset page tokens.

A token carries the last key of the page it ends and a fingerprint of the
request's filters, signed with HMAC-SHA256. A token that was altered, or that
is reused with other filters, is INVALID_ARGUMENT.
"""

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument

_SIGNATURE_BYTES = 16


def resolve_page_size(requested: int, default: int, maximum: int) -> int:
    """0 means the default, above the maximum means the maximum, negative is an error."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", f"must be >= 0, got {requested}")])
    return min(requested or default, maximum)


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, filters: dict[str, Any], last_key: list[Any]) -> str:
        payload = json.dumps({"k": last_key, "f": _fingerprint(filters)},
                             separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload + self._sign(payload)).decode().rstrip("=")

    def decode(self, token: str, filters: dict[str, Any]) -> list[Any] | None:
        """The last key encoded in `token`, or None for an empty token (the first page)."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise _bad_token("malformed page token") from exc
        payload, signature = raw[:-_SIGNATURE_BYTES], raw[-_SIGNATURE_BYTES:]
        if len(raw) <= _SIGNATURE_BYTES or not hmac.compare_digest(signature,
                                                                   self._sign(payload)):
            raise _bad_token("page token was not issued by this service or was altered")
        body = json.loads(payload)
        if body.get("f") != _fingerprint(filters):
            raise _bad_token("page token belongs to a request with other filters; "
                             "start again without a page token")
        return body["k"]

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_SIGNATURE_BYTES]


def _fingerprint(filters: dict[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)])
