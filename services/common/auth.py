"""Bearer-token verification (services) and minting (the token CLI)."""

import contextvars
import time

import jwt

from services.common.config import AuthSettings
from services.common.errors import Unauthenticated

_current_user: contextvars.ContextVar[str] = contextvars.ContextVar("epochlens_user")


def current_user() -> str:
    """The authenticated user of the RPC being served (set by the auth interceptor)."""
    return _current_user.get()


def set_current_user(user_id: str) -> contextvars.Token:
    return _current_user.set(user_id)


class TokenVerifier:
    """Checks `authorization: Bearer <JWT>` values; the `sub` claim is the user id."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._algorithm = settings.jwt_algorithm
        if settings.jwt_algorithm == "HS256":
            self._key: str | bytes = settings.jwt_secret or ""
        else:
            self._key = settings.jwt_public_key_file.read_bytes()  # type: ignore[union-attr]

    def verify_header(self, header: str | None) -> str:
        if not header:
            raise Unauthenticated("missing authorization metadata: expected 'Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> str:
        s = self._settings
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[self._algorithm], audience=s.jwt_audience,
                issuer=s.jwt_issuer, leeway=s.jwt_leeway_s,
                options={"require": ["sub", "exp"], "verify_aud": s.jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", {"cause": "expired"}) from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}", {"cause": "invalid"}) from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or "\x00" in subject:
            raise Unauthenticated("token has no usable 'sub' claim (a non-empty string "
                                  "without NUL characters)", {"cause": "invalid"})
        return subject


def mint_token(settings: AuthSettings, user_id: str, ttl_s: int | None = None) -> str:
    """A signed token for `user_id`, valid for ttl_s (default: settings.token_ttl_s)."""
    return mint_token_expiring(settings, user_id, ttl_s)[0]


def mint_token_expiring(settings: AuthSettings, user_id: str,
                        ttl_s: int | None = None) -> tuple[str, int]:
    """A signed token for `user_id` and its `exp` (seconds since the epoch)."""
    now = int(time.time())
    ttl = ttl_s or settings.token_ttl_s
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl}
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_algorithm == "HS256":
        return jwt.encode(claims, settings.jwt_secret, algorithm="HS256"), now + ttl
    reason = signing_unavailable(settings)
    if reason is not None:
        raise ValueError(reason)
    key = settings.jwt_private_key_file.read_bytes()  # type: ignore[union-attr]
    return jwt.encode(claims, key, algorithm="RS256"), now + ttl


def signing_unavailable(settings: AuthSettings) -> str | None:
    """Why tokens cannot be minted with these settings (None: they can): RS256 verifies with
    the public key, and signing needs the private key file."""
    if settings.jwt_algorithm == "RS256" and settings.jwt_private_key_file is None:
        return "EPOCHLENS_AUTH_JWT_PRIVATE_KEY_FILE is required to mint RS256 tokens"
    return None
