"""Signing in and out: POST /auth/login (a token from the login form), POST /auth/logout,
POST /auth/links (a one-time link for the token of `Authorization: Bearer`, what `epochlens
ui` asks for) and GET /auth/link?code=... (the link itself: taken once, it sets the cookie).

The token is checked with the query service before it is kept; the browser keeps it in an
HttpOnly cookie and never sees the signing secret. State-changing routes are POST only and
refuse cross-site requests (services.web.session.refuse_cross_site).
"""

import logging
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from services.web.errors import NO_STORE, ApiError, bad_request, error_response, unauthenticated
from services.web.session import (
    bearer_token,
    checked_token,
    clear_session,
    refuse_cross_site,
    set_session,
)
from services.web.state import web_state

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"


async def login(request: Request) -> Response:
    try:
        refuse_cross_site(request)
        form = await read_form(request)
        tokens = form.get("token", [])
        if len(tokens) != 1 or not tokens[0].strip():
            raise bad_request("sign in with a token", [("token", "required, once")])
        token = checked_token(tokens[0].strip())
        await web_state(request).check_token(token)
    except ApiError as error:
        return error_response(request, error, "Sign-in failed")
    return signed_in(request, token)


async def logout(request: Request) -> Response:
    try:
        refuse_cross_site(request)
    except ApiError as error:
        return error_response(request, error, "Sign-out refused")
    response = RedirectResponse("/login", status_code=303, headers=NO_STORE)
    clear_session(response, web_state(request).settings)
    return response


async def create_link(request: Request) -> Response:
    """A one-time sign-in link for the caller's bearer token (checked first)."""
    state = web_state(request)
    try:
        refuse_cross_site(request)
        token = bearer_token(request)
        if token is None:
            raise unauthenticated("send the token to make a link for as "
                                  "'Authorization: Bearer <token>'")
        await state.check_token(token)
        code = state.links.add(token)
    except ApiError as error:
        return error_response(request, error, "No sign-in link")
    body = {"link": f"/auth/link?code={code}",
            "expiresInSeconds": state.settings.login_link_ttl_s}
    return JSONResponse(body, status_code=201, headers=NO_STORE)


async def use_link(request: Request) -> Response:
    """Signs the browser in with the link's token, once; an unknown, used or expired code
    is a 401 page."""
    state = web_state(request)
    try:
        refuse_cross_site(request)
        token = state.links.take(request.query_params.get("code", ""))
        if token is None:
            raise unauthenticated("This sign-in link is expired or was already used: run "
                                  "`epochlens ui` again for a new one, or sign in with a token.")
    except ApiError as error:
        log.info("sign-in link refused: %s", error.status.message)
        return error_response(request, error, "Sign-in link not valid")
    return signed_in(request, token)


def signed_in(request: Request, token: str) -> Response:
    response = RedirectResponse("/", status_code=303, headers=NO_STORE)
    set_session(response, web_state(request).settings, token)
    return response


async def read_form(request: Request) -> dict[str, list[str]]:
    """The url-encoded form of the body, read up to max_body_bytes (413 beyond, 415 for
    another content type)."""
    limit = web_state(request).settings.max_body_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise ApiError(bad_request(f"expected a form ({FORM_TYPE})",
                                   [("content-type", f"got {content_type or 'none'}")]).status,
                       http_status=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(bad_request("request body too large",
                                       [("body", f"more than {limit} bytes")]).status,
                           http_status=413)
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise bad_request("form is not UTF-8", [("body", "not UTF-8")]) from None


ROUTES = [
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/links", create_link, methods=["POST"]),
    Route("/auth/link", use_link, methods=["GET"]),
]
