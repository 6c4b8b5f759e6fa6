"""The caller's bearer token: from the Authorization header or the session cookie; the
cookie itself (HttpOnly, SameSite=Strict, path /, Secure per setting); and the refusal of
cross-site state-changing requests.

The web service never verifies or signs tokens: it forwards them to the query service,
which does. A token here is only checked to be one header value (visible ASCII), so that a
malformed one is refused as UNAUTHENTICATED instead of failing inside gRPC.
"""

import re
from urllib.parse import urlsplit

from google.rpc import code_pb2
from starlette.requests import Request
from starlette.responses import Response

from services.web.config import WebSettings
from services.web.errors import ApiError, status_of, unauthenticated

_TOKEN = re.compile(r"[\x21-\x7e]+")
# Sec-Fetch-Site values of a request the user made on this site (or typed / opened from
# outside the browser: "none").
_OWN_SITE = ("same-origin", "none")


def checked_token(token: str) -> str:
    """The token, or UNAUTHENTICATED when it cannot be a header value."""
    if not _TOKEN.fullmatch(token):
        raise unauthenticated("malformed token: expected visible ASCII characters only")
    return token


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without the header."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthenticated("the Authorization header must be 'Bearer <token>'")
    return checked_token(token.strip())


def request_token(request: Request, settings: WebSettings) -> str:
    """The caller's token: an Authorization header if sent, else the session cookie."""
    token = bearer_token(request)
    if token is not None:
        return token
    cookie = request.cookies.get(settings.cookie_name)
    if cookie:
        return checked_token(cookie)
    raise unauthenticated("not signed in: sign in at /login (or `epochlens ui`), or send "
                          "'Authorization: Bearer <token>'")


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def set_session(response: Response, settings: WebSettings, token: str) -> None:
    """Keeps the token in the browser as an HttpOnly, SameSite=Strict cookie (no Max-Age:
    it ends with the browser session; the token's own expiry still applies)."""
    response.set_cookie(settings.cookie_name, token, path="/", httponly=True,
                        samesite="strict", secure=settings.cookie_secure)


def clear_session(response: Response, settings: WebSettings) -> None:
    response.delete_cookie(settings.cookie_name, path="/", httponly=True, samesite="strict",
                           secure=settings.cookie_secure)


def refuse_cross_site(request: Request) -> None:
    """PERMISSION_DENIED for a request another site made the browser send: Sec-Fetch-Site
    other than same-origin/none, or an Origin whose host is not this request's Host. A
    request with neither header (curl, the CLI) passes."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in _OWN_SITE:
        raise ApiError(status_of(code_pb2.PERMISSION_DENIED,
                                 f"cross-site request refused (Sec-Fetch-Site: {site})"))
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise ApiError(status_of(code_pb2.PERMISSION_DENIED,
                                 "cross-site request refused (Origin is not this site)"))
