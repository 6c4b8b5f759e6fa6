"""services.query.pagination: page sizes, page tokens (signed, bound to the caller, the
method and the filters, strictly typed) and pages bounded by rows and bytes; and the
relation between the writer's text limits and the query service's byte budget."""

import base64
import contextvars
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from epochlens.v1 import query_pb2
from services.common.auth import set_current_user
from services.common.errors import InvalidArgument
from services.query.config import QuerySettings
from services.query.pagination import (
    INT,
    TEXT,
    TIMESTAMP,
    UUID,
    PageLimits,
    PageTokens,
    fill_page,
    resolve_page_size,
)
from services.query.servicer import PAGE_KEYS, add_prediction
from services.writer.config import WriterSettings


def as_user(user: str, call, *args):
    """call(*args) in a context where `user` is the caller (as the auth interceptor sets)."""
    def run():
        set_current_user(user)
        return call(*args)
    return contextvars.copy_context().run(run)


def signed(secret: bytes, body: object) -> str:
    """A token of any JSON content, signed as the service signs (HMAC-SHA256, 16 bytes)."""
    payload = json.dumps(body).encode()
    tag = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + tag).decode().rstrip("=")


def refused(tokens: PageTokens, token: str, filters: dict, user: str = "alice") -> str:
    with pytest.raises(InvalidArgument) as err:
        as_user(user, tokens.decode, token, filters)
    (violation,) = err.value.violations
    assert violation.field == "page_token"
    return violation.description
@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (50, 50), (500, 500),
                                                     (501, 500), (10**9, 500)])
def test_page_size_default_and_clamp(requested, expected):
    assert resolve_page_size(requested, 50, 500) == expected


def test_negative_page_size_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        resolve_page_size(-1, 50, 500)
    assert err.value.violations[0].field == "page_size"


KEY = (TIMESTAMP, UUID, INT, TEXT)
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
RUN = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_token_round_trip_typed_and_empty_token():
    tokens = PageTokens(b"k", "ListThings", KEY)
    filters = {"run_id": "r", "epoch": 2}
    token = as_user("alice", tokens.encode, filters, (WHEN, RUN, 30, "chrf"))
    assert as_user("alice", tokens.decode, token, filters) == (WHEN, RUN, 30, "chrf")
    naive = WHEN.replace(tzinfo=None)  # SQLite hands back naive UTC times
    token = as_user("alice", tokens.encode, filters, (naive, RUN, -1, ""))
    assert as_user("alice", tokens.decode, token, filters) == (WHEN, RUN, -1, "")
    assert as_user("alice", tokens.decode, "", filters) is None


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: "A" + t[1:] if t[0] != "A" else "B" + t[1:],
    lambda t: "!!!",
    lambda t: "QQ",
    lambda t: "\u00e9" + t,
])
def test_altered_token_is_refused(mutate):
    tokens = PageTokens(b"k", "ListThings", (INT,))
    token = as_user("alice", tokens.encode, {"f": 1}, (1,))
    refused(tokens, mutate(token), {"f": 1})


def test_token_of_another_key_caller_method_or_filters_is_refused():
    token = as_user("alice", PageTokens(b"k", "ListThings", (INT,)).encode, {"epoch": 1}, (1,))
    for tokens, filters, user in ((PageTokens(b"other", "ListThings", (INT,)), {"epoch": 1},
                                   "alice"),
                                  (PageTokens(b"k", "ListThings", (INT,)), {"epoch": 2}, "alice"),
                                  (PageTokens(b"k", "ListOther", (INT,)), {"epoch": 1}, "alice"),
                                  (PageTokens(b"k", "ListThings", (INT,)), {"epoch": 1}, "bob")):
        refused(tokens, token, filters, user)


def fingerprint(user: str, method: str, filters: dict) -> str:
    """The fingerprint a genuine token carries, taken from one the service made."""
    token = as_user(user, PageTokens(b"k", method, (INT,)).encode, filters, (1,))
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return json.loads(raw[:-16])["f"]


@pytest.mark.parametrize("key", [
    [5, str(RUN), 1, "a"],  # an int where a time is expected
    ["2024-05-06T07:08:09", str(RUN), 1, "a"],  # a time without its offset
    ["yesterday", str(RUN), 1, "a"],
    [WHEN.isoformat(), [str(RUN)], 1, "a"],  # a list where a uuid is expected
    [WHEN.isoformat(), "not-a-uuid", 1, "a"],
    [WHEN.isoformat(), "{" + str(RUN) + "}", 1, "a"],  # not the canonical form
    [WHEN.isoformat(), str(RUN), "1", "a"],  # a string where an int is expected
    [WHEN.isoformat(), str(RUN), True, "a"],
    [WHEN.isoformat(), str(RUN), 1.5, "a"],
    [WHEN.isoformat(), str(RUN), 2**63, "a"],  # beyond the database's 64-bit integers
    [WHEN.isoformat(), str(RUN), 1, None],
    [WHEN.isoformat(), str(RUN), 1, "a\x00b"],
    [WHEN.isoformat(), str(RUN), 1, "\ud800"],  # a lone surrogate
    [WHEN.isoformat(), str(RUN), 1],  # a value missing
    [WHEN.isoformat(), str(RUN), 1, "a", 2],  # one too many
    {"0": 1},
    "k",
    None,
])
def test_signed_token_with_a_wrong_typed_key_is_refused(key):
    tokens = PageTokens(b"k", "ListThings", KEY)
    body = {"k": key, "f": fingerprint("alice", "ListThings", {})}
    assert "ListThings must be [timestamp, uuid, integer, string]" in refused(
        tokens, signed(b"k", body), {})


@pytest.mark.parametrize("body", [[1], {"k": [1]}, {"f": "x"}, {"k": [1], "f": 3},
                                  {"k": [1], "f": "x", "extra": 1}, "text", 7])
def test_signed_token_with_a_wrong_shape_is_refused(body):
    assert refused(PageTokens(b"k", "ListThings", (INT,)), signed(b"k", body), {}) == (
        "token content is not valid")


def test_signed_token_that_is_not_json_is_refused():
    payload = b"\xff\xfe not json"
    tag = hmac.new(b"k", payload, hashlib.sha256).digest()[:16]
    token = base64.urlsafe_b64encode(payload + tag).decode()
    assert refused(PageTokens(b"k", "ListThings", (INT,)), token, {}) == (
        "token content is not valid")


def test_every_paged_method_has_a_key_schema():
    paged = {m.name for m in query_pb2.DESCRIPTOR.services_by_name["QueryService"].methods
             if "page_token" in m.input_type.fields_by_name}
    assert paged == set(PAGE_KEYS) == {"ListRuns", "ListPredictions", "ListEpochs",
                                       "CompareSample", "ListJudgments"}


def prediction_row(step: int, text_chars: int, char: str = "x") -> SimpleNamespace:
    text = char * text_chars
    return SimpleNamespace(run_id=RUN, epoch=1, step=step, sample_index=0, prompt=text,
                           ground_truth=text, prediction=text, generation_time_ms=1.0,
                           prompt_tokens=None, completion_tokens=None, create_time=WHEN)


def page(rows, limits: PageLimits) -> query_pb2.ListPredictionsResponse:
    response = query_pb2.ListPredictionsResponse()
    fill_page(response, "predictions", rows, limits, add_prediction,
              lambda last: f"after-{last.step}")
    return response


def test_page_stops_at_the_byte_budget_and_resumes_after_its_last_row():
    rows = [prediction_row(step, 1000) for step in range(10)]
    one_row = page(rows[:1], PageLimits(10, 10**6)).ByteSize()
    budget = 3 * one_row + 20  # three rows and a token fit, four rows do not
    response = page(rows + [prediction_row(10, 1000)], PageLimits(10, budget))
    assert [p.step for p in response.predictions] == [0, 1, 2]
    assert response.next_page_token == "after-2"
    assert response.ByteSize() <= budget
    tight = page(rows, PageLimits(10, 3 * one_row))  # three rows fit, not with the token
    assert [p.step for p in tight.predictions] == [0, 1]
    assert tight.next_page_token == "after-1" and tight.ByteSize() <= 3 * one_row


def test_page_holds_one_row_larger_than_the_budget_and_rows_bound_it_too():
    rows = [prediction_row(step, 1000) for step in range(3)]
    alone = page(rows, PageLimits(10, 1024))
    assert [p.step for p in alone.predictions] == [0] and alone.next_page_token == "after-0"
    counted = page(rows, PageLimits(2, 10**6))
    assert [p.step for p in counted.predictions] == [0, 1]
    assert counted.next_page_token == "after-1"
    assert page(rows[:2], PageLimits(2, 10**6)).next_page_token == ""
    assert page([], PageLimits(2, 10**6)).next_page_token == ""


def test_one_row_at_the_writers_limits_fits_the_default_budget():
    """The largest prediction the writer accepts (every text max_text_chars characters of 4
    UTF-8 bytes), with the largest CompareSample header, fits max_response_bytes, which is
    below max_message_bytes: a page of one row always fits a message."""
    writer = WriterSettings(_env_file=None)
    query = QuerySettings(page_token_secret="s", _env_file=None)
    row = prediction_row(2**62, writer.max_text_chars, "\U0001f600")
    largest = query_pb2.ListPredictionsResponse()
    add_prediction(largest.predictions, row)
    largest.next_page_token = "t" * 1024
    header = query_pb2.CompareSampleResponse(prompt=row.prompt, ground_truth=row.prompt)
    assert largest.ByteSize() + header.ByteSize() < query.max_response_bytes
    assert query.max_response_bytes < query.max_message_bytes


def test_byte_budget_must_be_below_the_message_limit():
    with pytest.raises(ValidationError, match="max_response_bytes"):
        QuerySettings(page_token_secret="s", max_response_bytes=16 * 1024 * 1024,
                      _env_file=None)
