import pytest

from services.common.errors import InvalidArgument
from services.query.pagination import PageTokens, resolve_page_size


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (50, 50), (500, 500),
                                                     (501, 500), (10**9, 500)])
def test_page_size_default_and_clamp(requested, expected):
    assert resolve_page_size(requested, 50, 500) == expected


def test_negative_page_size_is_invalid():
    with pytest.raises(InvalidArgument) as err:
        resolve_page_size(-1, 50, 500)
    assert err.value.violations[0].field == "page_size"


def test_token_round_trip_and_empty_token():
    tokens = PageTokens(b"k")
    filters = {"run_id": "r", "epoch": 2}
    assert tokens.decode(tokens.encode(filters, [30, 4]), filters) == [30, 4]
    assert tokens.decode("", filters) is None


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: "A" + t[1:] if t[0] != "A" else "B" + t[1:],
    lambda t: "!!!",
    lambda t: "QQ",
])
def test_altered_token_is_refused(mutate):
    tokens = PageTokens(b"k")
    token = tokens.encode({"f": 1}, [1])
    with pytest.raises(InvalidArgument) as err:
        tokens.decode(mutate(token), {"f": 1})
    assert err.value.violations[0].field == "page_token"


def test_token_from_other_key_or_filters_is_refused():
    token = PageTokens(b"k").encode({"epoch": 1}, [1])
    for tokens, filters in ((PageTokens(b"other"), {"epoch": 1}), (PageTokens(b"k"), {"epoch": 2})):
        with pytest.raises(InvalidArgument):
            tokens.decode(token, filters)
