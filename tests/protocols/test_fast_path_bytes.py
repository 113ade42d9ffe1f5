"""The fast path's per-request byte work, without sockets: the request head parsed once per
distinct head (agent.app.parse_plain_infer), the answer's bytes (agent.app._answer). Quick unit
tests beside test_fast_path.py, whose real agent shows the same requests answered end to end."""
from __future__ import annotations

import pytest

from agent import app as appmod
from agent.app import _answer, parse_plain_infer

BODY = b'{"inputs": []}'
HEAD = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY))


def test_a_head_seen_before_is_not_parsed_again_and_its_parse_cannot_be_changed():
    """The second request with the same head (the usual client: one head per request shape) gets
    the first one's parse, without the regex (looked up by the head's bytes, wherever the body and
    the reads end); its headers are a tuple, so no request can alter what the next one is sent."""
    appmod._HEADS.clear()
    first = parse_plain_infer(HEAD + BODY, 65536)
    assert first == ("iris", ((b"host", b"h"), (b"content-type", b"application/json"),
                              (b"content-length", b"%d" % len(BODY))), True, len(BODY), len(HEAD))
    assert parse_plain_infer(HEAD + BODY[:3], 65536) is first  # (a body not all in yet: the same head)
    assert parse_plain_infer(HEAD + BODY + HEAD, 65536) is first  # (pipelined: the first head only)
    assert isinstance(first[1], tuple)


@pytest.mark.parametrize("change, expected", [
    ((b"HTTP/1.1", b"HTTP/1.0"), ("keep_alive", False)),
    ((b"Host: h\r\n", b"Host: h\r\nConnection: close\r\n"), ("keep_alive", False)),
    ((b"Content-Length: 14", b"Content-Length: 15"), ("length", 15)),
    ((b"/iris/", b"/other/"), ("name", "other")),
    ((b"Host: h\r\n", b"Host: h\r\nTransfer-Encoding: chunked\r\n"), None),  # uvicorn's parser takes these
    ((b"Host: h\r\n", b"Host: h\r\nContent-Length: 14\r\n"), None),
    ((b"Host: h\r\n", b"Host: h\n"), None),
])
def test_a_head_that_differs_by_one_field_gets_its_own_parse(change, expected):
    """A cached head never answers for another: a different version, Connection, length or model
    is parsed afresh, and a head refused once is refused again (only heads the fast path takes are
    kept)."""
    appmod._HEADS.clear()
    assert parse_plain_infer(HEAD + BODY, 65536)[2] is True
    other = HEAD.replace(*change)
    for _ in range(2):
        got = parse_plain_infer(other + BODY, 65536)
        if expected is None:
            assert got is None
        else:
            field, value = expected
            assert got[{"name": 0, "keep_alive": 2, "length": 3}[field]] == value
    assert parse_plain_infer(HEAD + BODY, 65536)[2] is True  # the first head's parse is untouched


def test_the_head_cache_is_bounded_and_a_head_past_max_head_is_never_ours():
    appmod._HEADS.clear()
    for i in range(appmod._HEADS_MAX + 10):
        head = HEAD.replace(b"Host: h", b"Host: h%d" % i)
        assert parse_plain_infer(head + BODY, 65536)[3] == len(BODY)
    assert len(appmod._HEADS) <= appmod._HEADS_MAX
    long = HEAD.replace(b"Host: h", b"Host: " + b"h" * appmod._HEAD_CACHED_BYTES)
    assert parse_plain_infer(long + BODY, 65536)[0] == "iris" and long not in appmod._HEADS  # parsed, not kept
    assert parse_plain_infer(HEAD + BODY, len(HEAD) - 1) is None  # the head's bound holds for a cached head
    assert parse_plain_infer(HEAD + BODY, 65536) is not None


@pytest.mark.parametrize("headers, keep_alive, expected", [
    ([], True, b"\r\n{}"),
    ([], False, b"connection: close\r\n\r\n{}"),
    ([(b"content-length", b"2")], True, b"content-length: 2\r\n\r\n{}"),
    ([(b"content-type", b"application/json"), (b"content-length", b"2")], False,
     b"content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"),
])
def test_an_answer_is_one_well_formed_message_with_any_number_of_headers(headers, keep_alive, expected):
    defaults = [(b"date", b"Wed, 02 Dec 2026 20:00:00 GMT"), (b"server", b"uvicorn")]
    assert _answer(defaults, (200, headers, b"{}"), keep_alive) == (
        b"HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 20:00:00 GMT\r\nserver: uvicorn\r\n" + expected)


def test_a_header_value_with_a_control_byte_is_a_502_even_after_clean_values_of_that_header():
    """Values are checked once each and then known clean; a value never seen (one with a control
    byte) is still checked, whatever came before it."""
    defaults = [(b"server", b"uvicorn")]
    clean = _answer(defaults, (200, [(b"content-type", b"text/plain")], b"ok"), True)
    assert clean.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/plain" in clean
    for value in (b"text/plain\x01", b"text\x7f", b"a\rb"):
        bad = _answer(defaults, (200, [(b"content-type", b"text/plain"), (b"x", value)], b"secret"), True)
        assert bad.startswith(b"HTTP/1.1 502 ") and b"secret" not in bad and b"cannot be passed on" in bad
    assert _answer(defaults, (200, [(b"content-type", b"text/plain")], b"ok"), True) == clean
