"""Signing in to the web service over real HTTP: the login form sets an HttpOnly,
SameSite=Strict cookie that the API then accepts; a token the query service refuses is a
401 with its message; a one-time link works once; cross-site POSTs are refused; pages and
/healthz carry the security headers."""

import asyncio
import html

import httpx
import pytest
from typer.testing import CliRunner

from epochlens.v1 import query_pb2
from services.cli.main import app as cli_app
from services.common.auth import mint_token
from services.web.pages import STATIC_DIR
from services.web.server import start as start_web
from services.web.state import LinkStore
from tests.web.conftest import bearer, grpc_answer, web_settings

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def cookie_attributes(answer: httpx.Response) -> list[str]:
    """The one Set-Cookie header: name=value first, then its attributes in lower case."""
    (header,) = answer.headers.get_list("set-cookie")
    first, *rest = [part.strip() for part in header.split(";")]
    return [first, *(part.lower() for part in rest)]


async def test_login_sets_an_httponly_strict_cookie_the_api_accepts(stack, web, http):
    token = mint_token(stack.auth, "web-carol")
    answer = await http.post("/auth/login", data={"token": token})
    assert (answer.status_code, answer.headers["location"]) == (303, "/")
    attributes = cookie_attributes(answer)
    assert attributes[0] == f"epochlens_session={token}"
    assert sorted(attributes[1:]) == ["httponly", "path=/", "samesite=strict"]
    assert answer.headers["cache-control"] == "no-store"
    async with httpx.AsyncClient(base_url=web.url, cookies={"epochlens_session": token}) as c:
        runs = await c.get("/v1/runs")
    assert (runs.status_code, runs.json()) == (200, {"runs": [], "nextPageToken": ""})


async def test_login_with_a_refused_token_is_401_with_the_query_services_message(stack, http):
    expected = await grpc_answer(stack, "ListRuns", query_pb2.ListRunsRequest(page_size=1),
                                 (("authorization", "Bearer not.a.jwt"),))
    answer = await http.post("/auth/login", data={"token": "not.a.jwt"})
    assert (answer.status_code, answer.json()) == expected
    assert answer.status_code == 401 and answer.json()["message"].startswith("invalid token")
    assert "set-cookie" not in answer.headers
    page = await http.post("/auth/login", data={"token": "not.a.jwt"},
                           headers={"Accept": "text/html"})
    assert (page.status_code, page.headers["content-type"]) == (401, "text/html; charset=utf-8")
    message = html.escape(expected[1]["message"])
    assert f"<h1>Sign-in failed</h1><p>{message}</p>" in page.text
    assert page.headers["content-security-policy"] == CSP


async def test_login_form_problems(http):
    missing = await http.post("/auth/login", data={"user": "x"})
    assert (missing.status_code, missing.json()["details"][0]["fieldViolations"]) == (
        400, [{"field": "token", "description": "required, once"}])
    as_json = await http.post("/auth/login", json={"token": "x"})
    assert (as_json.status_code, as_json.json()["code"]) == (415, 3)
    huge = await http.post("/auth/login", data={"token": "x" * 20000})
    assert huge.status_code == 413
    assert (await http.get("/auth/login")).status_code == 405


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"},
                                     {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"}])
async def test_cross_site_posts_are_refused(headers, stack, http):
    token = mint_token(stack.auth, "web-carol")
    for path, data, auth in (("/auth/login", {"token": token}, {}), ("/auth/logout", None, {}),
                             ("/auth/links", None, bearer(stack, "web-carol"))):
        answer = await http.post(path, data=data, headers={**auth, **headers})
        assert (answer.status_code, answer.json()["code"]) == (403, 7), path
        assert "set-cookie" not in answer.headers


async def test_same_origin_post_is_accepted(stack, web, http):
    token = mint_token(stack.auth, "web-carol")
    host = web.url.removeprefix("http://")
    answer = await http.post("/auth/login", data={"token": token},
                             headers={"Origin": web.url, "Sec-Fetch-Site": "same-origin",
                                      "Host": host})
    assert answer.status_code == 303


async def test_logout_clears_the_cookie(http):
    answer = await http.post("/auth/logout")
    assert (answer.status_code, answer.headers["location"]) == (303, "/login")
    attributes = cookie_attributes(answer)
    assert attributes[0] == "epochlens_session=\"\""
    assert "max-age=0" in attributes and "httponly" in attributes


async def test_one_time_link_signs_in_once(stack, web, http):
    sent = mint_token(stack.auth, "web-dave")
    created = await http.post("/auth/links", headers={"Authorization": f"Bearer {sent}"})
    assert created.status_code == 201
    link = created.json()["link"]
    assert link.startswith("/auth/link?code=") and len(link) > len("/auth/link?code=") + 40
    assert created.json()["expiresInSeconds"] == 300.0
    used = await http.get(link)
    assert (used.status_code, used.headers["location"]) == (303, "/")
    token = cookie_attributes(used)[0].split("=", 1)[1]
    assert token == sent
    async with httpx.AsyncClient(base_url=web.url, cookies={"epochlens_session": token}) as c:
        runs = await c.get("/v1/runs")
    assert (runs.status_code, runs.json()) == (200, {"runs": [], "nextPageToken": ""})
    again = await http.get(link, headers={"Accept": "text/html"})
    assert again.status_code == 401 and "set-cookie" not in again.headers
    assert "expired or was already used" in again.text
    assert again.headers["content-security-policy"] == CSP
    unknown = await http.get("/auth/link?code=nope")
    assert (unknown.status_code, unknown.json()["code"]) == (401, 16)


async def test_link_needs_an_accepted_bearer_token(http):
    assert (await http.post("/auth/links")).status_code == 401
    refused = await http.post("/auth/links", headers={"Authorization": "Bearer x.y.z"})
    assert (refused.status_code, refused.json()["code"]) == (401, 16)
    cross = await http.get("/auth/link?code=x", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403


def test_link_store_expires_and_caps_pending_links():
    now = [0.0]
    store = LinkStore(ttl_s=10.0, max_pending=2, clock=lambda: now[0])
    first, second = store.add("t1"), store.add("t2")
    with pytest.raises(Exception) as full:
        store.add("t3")
    assert full.value.http_status == 429
    assert store.take(first) == "t1" and store.take(first) is None
    now[0] = 10.0
    assert store.take(second) is None  # expired at ttl_s
    assert store.take(store.add("t4")) == "t4"


async def test_epochlens_ui_prints_a_link_that_signs_in(stack, web, http):
    env = {"EPOCHLENS_CLI_WEB_URL": web.url, "EPOCHLENS_CLI_TOKEN": mint_token(stack.auth,
                                                                              "web-erin")}
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["ui", "--no-browser"],
                                     env=env)
    assert result.exit_code == 0, result.output
    link = result.output.strip().splitlines()[-1]
    assert link.startswith(f"{web.url}/auth/link?code=")
    used = await http.get(link)
    assert (used.status_code, used.headers["location"]) == (303, "/")


async def test_epochlens_ui_without_a_web_service_says_so(stack):
    env = {"EPOCHLENS_CLI_WEB_URL": "http://127.0.0.1:9", "EPOCHLENS_CLI_TOKEN": "x"}
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["ui", "--no-browser"],
                                     env=env)
    assert result.exit_code == 1
    assert "cannot reach the web service at http://127.0.0.1:9" in result.output


@pytest.mark.parametrize("path", ["/", "/login", "/compare", "/runs/abc", "/runs/abc/vs",
                                  "/runs/abc/samples/3"])
async def test_page_paths_serve_index_html_with_csp(path, http):
    answer = await http.get(path)
    index = STATIC_DIR / "index.html"
    assert index.is_file(), "the frontend's index.html is committed"
    assert (answer.status_code, answer.text) == (200, index.read_text())
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"


async def test_static_files_and_unknown_paths(http):
    css = await http.get("/static/app.css")
    assert (css.status_code, css.headers["content-type"]) == (200, "text/css; charset=utf-8")
    assert css.headers["content-security-policy"] == CSP
    assert (await http.get("/static/nope.js")).status_code == 404
    assert (await http.get("/runs")).status_code == 404
    assert (await http.get("/static/../config.py")).status_code == 404


async def test_healthz_reports_the_query_service(web, http):
    answer = await http.get("/healthz")
    assert (answer.status_code, answer.json()) == (
        200, {"status": "SERVING", "query": "SERVING", "streams": 0})
    assert answer.headers["content-security-policy"] == CSP


async def test_healthz_is_503_without_a_query_service():
    running = await start_web(web_settings("127.0.0.1:9", health_timeout_s=0.5))
    try:
        async with httpx.AsyncClient(base_url=running.url) as client:
            answer = await client.get("/healthz")
            api = await client.get("/v1/runs", headers={"Authorization": "Bearer x"})
    finally:
        await running.stop()
    assert answer.status_code == 503
    assert answer.json()["status"] == "NOT_SERVING"
    assert answer.json()["query"].startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert (api.status_code, api.json()["code"]) == (503, 14)
