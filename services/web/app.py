"""The web service's ASGI app, built by a factory from its settings (tests build the very
same app): the JSON API from QueryService's google.api.http annotations, the sign-in
routes, the pages, and the security headers on every response. The channel to the query
service opens with the app's lifespan and closes with it."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from epochlens.v1 import query_pb2
from services.common.tls import client_tls
from services.web import api, auth, pages
from services.web.config import WebSettings
from services.web.httprules import bindings
from services.web.state import LinkStore, WebState

log = logging.getLogger(__name__)

QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"]


def create_app(settings: WebSettings) -> tuple[pages.SecurityHeaders, WebState]:
    """The ASGI app (wrapped in the security headers) and the state its routes share. The
    query_tls* files are read here: one that cannot be used is a StartupError."""
    state = WebState(settings, bindings(QUERY_SERVICE),
                     LinkStore(settings.login_link_ttl_s, settings.login_link_max_pending),
                     query_tls=client_tls(settings, "query_", "query service"))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        state.open()
        log.info("web service: query service at %s (%s), %d API routes",
                 settings.query_address, "TLS" if state.query_tls else "plaintext",
                 len(state.bindings))
        try:
            yield
        finally:
            await state.close()

    app = Starlette(routes=[*api.routes(state.bindings), *auth.ROUTES, *pages.ROUTES],
                    lifespan=lifespan)
    app.state.web = state
    return pages.SecurityHeaders(app), state
