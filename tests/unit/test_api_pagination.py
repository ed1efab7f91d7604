"""Page tokens and pages (reference §6.6): fleet's encoding and test vectors, its errors, its
trailing empty page, and the same rules on every list route."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict
from test_api_harness import HELLO, M1, V1, Api, serving_api

from fleetd.api.errors import ApiError
from fleetd.api.pagination import (
    BadToken,
    PageToken,
    b64url_decode,
    decode_token,
    find_page_token,
    page_of,
)
from fleetd.model import TargetState


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


@pytest.mark.parametrize(
    ("token", "text"),
    [
        (PageToken(100, 2), "ZAACAA=="),  # verified against fleet
        (PageToken(100, 1), "ZAABAA=="),  # verified against fleet
        (PageToken(12482, 0), "wjAAAA=="),  # fleet's pagination_test.go
        (PageToken(19, 11852), "EwBMLg=="),  # fleet's pagination_test.go
        (PageToken(1023, 0), "_wMAAA=="),
        (PageToken(45, 9), "LQAJAA=="),
        (PageToken(100, 11852), "ZABMLg=="),
    ],
)
def test_token_vectors(token: PageToken, text: str) -> None:
    assert token.encode() == text
    assert decode_token(text) == token


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_tokens_round_trip_and_match_pythons_base64(limit: int, page: int) -> None:
    token = PageToken(limit, page)
    text = token.encode()
    assert (
        text
        == base64.urlsafe_b64encode(
            limit.to_bytes(2, "little") + page.to_bytes(2, "little")
        ).decode()
    )
    assert decode_token(text) == token


@given(st.binary(max_size=40))
def test_decoder_agrees_with_base64_on_valid_input(data: bytes) -> None:
    assert b64url_decode(base64.urlsafe_b64encode(data).decode()) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Go's base64 errors, with Go's offsets
        ("basdfasdf", "illegal base64 data at input byte 8"),
        ("bogus", "illegal base64 data at input byte 4"),
        ("ZAACAA=", "illegal base64 data at input byte 7"),
        ("ZAACAA", "illegal base64 data at input byte 4"),
        ("ZA=ACAA==", "illegal base64 data at input byte 2"),
        ("ZAACAA==x", "illegal base64 data at input byte 8"),
        ("ZAAC+A==", "illegal base64 data at input byte 4"),  # standard alphabet is refused
        ("ZAAC/A==", "illegal base64 data at input byte 4"),
        ("Z===", "illegal base64 data at input byte 1"),
        ("éAAA", "illegal base64 data at input byte 0"),
        # decodes, but is not 4 bytes (fleet: Go's "EOF" / "unexpected EOF")
        ("", "page token must decode to 4 bytes, got 0"),
        ("ZAA=", "page token must decode to 4 bytes, got 2"),
        ("ZAACAAA=", "page token must decode to 4 bytes, got 5"),
    ],
)
def test_bad_tokens(text: str, message: str) -> None:
    with pytest.raises(BadToken) as caught:
        decode_token(text)
    assert str(caught.value) == message


def test_decoder_skips_line_breaks_as_go_does() -> None:
    assert decode_token("ZAAC\r\nAA==") == PageToken(100, 2)


def _find(query: list[tuple[str, str]], limit: int = 100) -> PageToken:
    return find_page_token(MultiDict(query), limit)


def test_find_page_token() -> None:
    assert _find([]) == PageToken(100, 1)
    assert _find([("filter", "x")], 7) == PageToken(7, 1)
    assert _find([("filter", "x"), ("nextPageToken", "ZABMLg==")]) == PageToken(100, 11852)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            [("nextPageToken", "LQAJAA=="), ("nextPageToken", "_wMAAA==")],
            "too many values for page token",
        ),
        (
            [("nextPageToken", "bogus")],
            "invalid nextPageToken: illegal base64 data at input byte 4",
        ),
        (
            [("nextPageToken", "")],
            "invalid nextPageToken: page token must decode to 4 bytes, got 0",
        ),
        ([("nextPageToken", "FAAJAA==")], "token limit must be 100"),
        ([("nextPageToken", "ZAAAAA==")], "token page must be greater than zero"),
    ],
)
def test_find_page_token_errors(query: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        _find(query)
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest.mark.parametrize(
    ("total", "limit", "page", "items", "next_page"),
    [
        (0, 100, 1, [], None),  # empty: no items, no token
        (1, 100, 1, [0], None),
        (99, 100, 1, list(range(99)), None),
        (100, 100, 1, list(range(100)), 2),  # exactly full: a token for the (empty) next page
        (100, 100, 2, [], None),
        (101, 100, 2, [100], None),
        (5, 2, 2, [2, 3], 3),
        (5, 2, 3, [4], None),
        (5, 2, 9, [], None),  # past the end
        (6, 2, 3, [4, 5], 4),
    ],
)
def test_page_of(
    total: int, limit: int, page: int, items: list[int], next_page: int | None
) -> None:
    got, next_token = page_of(list(range(total)), PageToken(limit, page))
    assert list(got) == items
    assert next_token == (PageToken(limit, next_page) if next_page else None)


def test_page_of_stops_at_the_last_encodable_page() -> None:
    items = list(range(0x10000 + 1))
    got, next_token = page_of(items, PageToken(1, 0xFFFF))
    assert (list(got), next_token) == ([0xFFFE], None)


@given(st.integers(0, 60), st.integers(1, 9))
def test_following_tokens_yields_every_item_once(total: int, limit: int) -> None:
    items = list(range(total))
    seen: list[int] = []
    token: PageToken | None = PageToken(limit, 1)
    pages = 0
    while token is not None:
        page, token = page_of(items, token)
        seen.extend(page)
        pages += 1
    assert seen == items
    # fleet's quirk, kept: an exact multiple ends with one empty page
    assert pages == total // limit + 1


# ---- over HTTP, on every list route ---------------------------------------------------------


async def _follow(
    api: Api, path: str, key: str, **params: str
) -> tuple[list[str], list[dict[str, object]]]:
    """Follow a list route's tokens; the tokens seen and every item."""
    tokens: list[str] = []
    items: list[dict[str, object]] = []
    while True:
        query = dict(params)
        if tokens:
            query["nextPageToken"] = tokens[-1]
        status, page, _ = await api.call("GET", path, params=query)
        assert status == 200, page
        items.extend(page.get(key, []))
        if "nextPageToken" not in page:
            return tokens, items
        tokens.append(page["nextPageToken"])
        assert len(tokens) < 50


@pytest.fixture
async def small_pages() -> AsyncIterator[Api]:
    harness = Api(token_limit=2)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()


async def test_units_pages(small_pages: Api) -> None:
    api = small_pages
    for n in range(4):
        await api.add_unit(f"u{n}.service", HELLO)
    tokens, units = await _follow(api, f"{V1}/units", "units")
    assert [u["name"] for u in units] == [f"u{n}.service" for n in range(4)]
    assert tokens == [PageToken(2, 2).encode(), PageToken(2, 3).encode()]  # last page empty
    status, page, _ = await api.call("GET", f"{V1}/units", params={"nextPageToken": tokens[-1]})
    assert (status, page) == (200, {})


async def test_states_pages_with_filters(small_pages: Api) -> None:
    api = small_pages
    for n in range(3):
        await api.run_unit(f"u{n}.service", M1)
    tokens, states = await _follow(api, f"{V1}/state", "states", machineID=M1)
    assert [s["name"] for s in states] == ["u0.service", "u1.service", "u2.service"]
    assert len(tokens) == 1


async def test_machines_pages(small_pages: Api) -> None:
    api = small_pages
    for n in range(5):
        await api.add_machine(f"m{n}")
    tokens, machines = await _follow(api, f"{V1}/machines", "machines")
    assert [m["id"] for m in machines] == [f"m{n}" for n in range(5)]
    assert len(tokens) == 2


@pytest.mark.parametrize("route", ["units", "state", "machines"])
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("nextPageToken=ZAACAA==&nextPageToken=ZAACAA==", "too many values for page token"),
        ("nextPageToken=bogus", "invalid nextPageToken: illegal base64 data at input byte 4"),
        ("nextPageToken=", "invalid nextPageToken: page token must decode to 4 bytes, got 0"),
        ("nextPageToken=ZAACAA==", "token limit must be 2"),
        ("nextPageToken=AgAAAA==", "token page must be greater than zero"),
    ],
)
async def test_bad_tokens_are_400_on_every_list(
    small_pages: Api, route: str, query: str, message: str
) -> None:
    assert await small_pages.error("GET", f"{V1}/{route}?{query}") == (400, message)


async def test_default_limit_is_100(api: Api) -> None:
    for n in range(100):
        await api.add_unit(f"u{n:03}.service", HELLO, TargetState.INACTIVE)
    status, page, _ = await api.call("GET", f"{V1}/units")
    assert (status, len(page["units"]), page["nextPageToken"]) == (200, 100, "ZAACAA==")
    status, page, _ = await api.call("GET", f"{V1}/units", params={"nextPageToken": "ZAACAA=="})
    assert (status, page) == (200, {})
