"""The data plane's upstream client against a real loopback server that misbehaves on demand."""
from __future__ import annotations

import asyncio

import pytest

from agent import upstream as upstream_module
from agent.upstream import Upstream, UpstreamBusy, UpstreamError, UnsafeRequest


class Server:
    """A raw HTTP/1.1 server: answers each request per `mode`, counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.mode = "ok"  # ok | close-after | drop-second | double | double-later | half-answer | slow | chunked | split | apart | conn-close | bare-lf | body-like-head
        self.targets: list[bytes] = []
        self.heads: list[bytes] = []
        self.release = asyncio.Event()  # requests to a target with "/hang" wait for it
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests += 1
                self.targets.append(head.split(b" ")[1])
                self.heads.append(head)
                served_here += 1
                if self.mode == "drop-second" and served_here == 2:
                    writer.close()  # like a keep-alive timer firing as the request arrives
                    return
                if b"/hang" in head.split(b"\r\n")[0]:
                    await self.release.wait()
                if self.mode in ("double", "double-later"):  # two answers to one request
                    first = b"echo:" + body
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(first), first))
                    if self.mode == "double-later":
                        await writer.drain()
                        await asyncio.sleep(0.05)  # the extra answer arrives while the connection idles
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra")
                    await writer.drain()
                    continue
                if self.mode == "half-answer":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                    await writer.drain()
                    writer.close()
                    return
                if self.mode == "slow":
                    await asyncio.sleep(1)
                if self.mode == "split":  # an interim answer, then a head cut across reads
                    for part in (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type:  text/plain \r\nX-A: 1\r",
                                 b"\nX-A: 2\r\nContent-Length: %d\r\n\r\necho:" % (len(body) + 5), body):
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.02)
                elif self.mode == "apart":  # the head in one write, the body in two more (as MLServer writes)
                    answer = b"echo:" + body
                    for part in (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nce-id: 7\r\ncontent-length: %d\r\n\r\n"
                                 % len(answer), answer[:3], answer[3:]):
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.02)
                elif self.mode == "conn-close":  # a head httptools reads, but not in the plain form
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nConnection: close\r\n"
                                 b"content-length: 2\r\n\r\nok")
                elif self.mode == "bare-lf":  # a head no reader here takes
                    writer.write(b"HTTP/1.1 200 OK\ncontent-type: text/plain\ncontent-length: 2\n\nok")
                elif self.mode == "body-like-head":  # a body whose bytes read like header lines, in the head's read
                    answer = b"echo:" + body + b"\r\nX-A: from-the-body\r\ncontent-encoding: gzip\r\n"
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
                elif self.mode == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n"
                                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                else:
                    answer = b"echo:" + body
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
                await writer.drain()
                if self.mode == "close-after":  # like a server whose keep-alive timer fired
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("mode", ["ok", "split"])
def test_connections_are_reused(mode):
    """`split`: a 100 Continue, then the answer's head cut across reads, with repeated names and
    padded values: the head is read whole (split from its bytes, not header by header), names
    lower-cased, values trimmed, repeated names kept in order."""
    async def main():
        async with Server() as srv:
            srv.mode = mode
            up = Upstream(srv.url)
            for i in range(10):
                status, headers, body = await up.request("POST", "/x", [], b"%d" % i, timeout=5)
                assert (status, body) == (200, b"echo:%d" % i)
                assert (b"content-type", b"text/plain") in headers
                if mode == "split":
                    assert headers == [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2"), (b"content-length", b"6")]
            assert up._idle and all(not conn._head for conn in up._idle)  # a pooled connection keeps no answer bytes
            await up.close()
            return srv.connections
    assert run(main()) == 1


def test_a_connection_the_server_closed_is_retried_once_on_a_fresh_one(monkeypatch):
    """The server closes a kept-alive connection as the next request arrives (its keep-alive
    timer fired), answering nothing: the request is sent once more on a fresh connection."""
    stale_seen = []
    original = upstream_module._Stale

    class CountingStale(original):
        def __init__(self, *args):
            stale_seen.append(args)
            super().__init__(*args)

    monkeypatch.setattr(upstream_module, "_Stale", CountingStale)

    async def main():
        async with Server() as srv:
            srv.mode = "drop-second"
            up = Upstream(srv.url)
            for i in range(3):
                status, _, body = await up.request("POST", "/x", [], b"%d" % i, timeout=5)
                assert (status, body) == (200, b"echo:%d" % i)
            await up.close()
            return srv.connections, srv.requests
    # requests 2 and 3 each reach a connection the server then drops: 3 connections, 5 requests seen
    assert run(main()) == (3, 5)
    assert len(stale_seen) == 2  # the retry path ran, for exactly those two


def test_idle_connections_expire():
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url, idle_timeout=0.05)
            await up.request("GET", "/", [], b"", timeout=5)
            await asyncio.sleep(0.1)
            await up.request("GET", "/", [], b"", timeout=5)
            await up.close()
            return srv.connections
    assert run(main()) == 2


def test_an_answer_broken_midway_is_an_error_not_a_retry():
    async def main():
        async with Server() as srv:
            srv.mode = "half-answer"
            up = Upstream(srv.url)
            with pytest.raises(UpstreamError, match="mid-answer"):
                await up.request("POST", "/x", [], b"a", timeout=5)
            await up.close()
            return srv.requests
    assert run(main()) == 1


def test_timeout_and_unreachable_server():
    async def main():
        async with Server() as srv:
            srv.mode = "slow"
            up = Upstream(srv.url)
            with pytest.raises(asyncio.TimeoutError):
                await up.request("GET", "/", [], b"", timeout=0.1)
            await up.close()
        dead = Upstream(srv.url)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await dead.request("GET", "/", [], b"", timeout=1)
    run(main())


def test_chunked_answers_are_decoded():
    async def main():
        async with Server() as srv:
            srv.mode = "chunked"
            up = Upstream(srv.url)
            status, _, body = await up.request("GET", "/", [], b"", timeout=5)
            await up.close()
            return status, body
    assert run(main()) == (200, b"abcde")


@pytest.mark.parametrize("mode", ["double", "double-later"])
def test_a_second_answer_to_one_request_never_reaches_another_request(mode):
    """A desynced server answers one request twice (in one write, or later while the connection
    idles): the extra answer is never handed to the next request; its connection is closed."""
    async def main():
        async with Server() as srv:
            srv.mode = mode
            up = Upstream(srv.url)
            answers = []
            for i in range(4):
                status, _, body = await up.request("POST", "/x", [], b"%d" % i, timeout=5)
                answers.append(body)
                await asyncio.sleep(0.1)  # let a late extra answer arrive
            await up.close()
            return answers, srv.connections
    answers, connections = run(main())
    assert answers == [b"echo:0", b"echo:1", b"echo:2", b"echo:3"]
    assert connections == 4  # no desynced connection was reused


@pytest.mark.parametrize("target, headers", [
    ("/v2/models/m/versions/1\r\nGET /x HTTP/1.1", []),
    ("/v2/models/m/versions/1 2", []),
    ("/v2/models/m/versions/\u00e9", []),
    ("/x", [(b"x-request-id", b"a\r\nx-evil: 1")]),
    ("/x", [(b"x-bad name", b"v")]),
])
def test_a_request_line_or_header_that_could_split_is_refused_before_sending(target, headers):
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            with pytest.raises(UnsafeRequest):
                await up.request("GET", target, headers, b"", timeout=5)
            await up.request("GET", "/ok", [], b"", timeout=5)
            await up.close()
            return srv.targets
    assert run(main()) == [b"/ok"]  # nothing of the refused request reached the server


def test_the_wait_for_a_pool_slot_counts_inside_the_timeout():
    """Two hanging requests hold a pool of two: a third waits for a slot only until its own
    timeout, and says which bound it hit."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url, max_connections=2)
            hanging = [asyncio.create_task(up.request("GET", f"/hang{i}", [], b"", timeout=30, key=f"m{i}"))
                       for i in range(2)]
            while srv.requests < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(UpstreamBusy, match="all 2 server connections busy"):
                await asyncio.wait_for(up.request("GET", "/x", [], b"", timeout=0.2, key="m2"), 20)
            srv.release.set()
            done = [(await t)[0] for t in hanging]
            status, _, _ = await up.request("GET", "/x", [], b"", timeout=5, key="m2")
            await up.close()
            return done, status
    assert run(main()) == ([200, 200], 200)  # the slots came back


def test_one_key_cannot_take_every_slot():
    """With max_per_key=2, two hanging requests to one model leave the rest of the pool to the
    others: a third to the same model is refused at its timeout, another model is answered."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url, max_connections=8, max_per_key=2)
            hanging = [asyncio.create_task(up.request("GET", "/hang", [], b"", timeout=30, key="slow"))
                       for _ in range(2)]
            while srv.requests < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(UpstreamBusy, match="2 requests to it already in flight"):
                await asyncio.wait_for(up.request("GET", "/hang", [], b"", timeout=0.2, key="slow"), 20)
            other = await asyncio.wait_for(up.request("GET", "/x", [], b"", timeout=5, key="fast"), 20)
            srv.release.set()
            await asyncio.gather(*hanging)
            await up.close()
            return other[0], srv.requests
    assert run(main()) == (200, 3)  # the refused request never reached the server


def test_a_cancelled_waiter_never_loses_a_slot():
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url, max_connections=1)
            first = asyncio.create_task(up.request("GET", "/hang", [], b"", timeout=30))
            while srv.requests < 1:
                await asyncio.sleep(0.01)
            waiters = [asyncio.create_task(up.request("GET", "/x", [], b"", timeout=30)) for _ in range(3)]
            await asyncio.sleep(0.05)
            for w in waiters:
                w.cancel()
            srv.release.set()
            await first
            results = [(await up.request("GET", "/x", [], b"", timeout=5))[0] for _ in range(3)]
            await up.close()
            return results
    assert run(main()) == [200, 200, 200]


# -- send_now(): the data plane's fast path (no task, no Future, one timer per connection)
async def _send_now(up, target, body=b"", timeout=5.0, keep=None, headers=()):
    """send_now() on the pool's idle connection; what its `done` got."""
    got = asyncio.get_running_loop().create_future()
    assert up.send_now("POST", target, list(headers), body, timeout, "m", got.set_result, keep)
    return await asyncio.wait_for(got, 10)


def test_send_now_times_out_at_its_own_deadline_on_a_reused_connection():
    """An answer that never comes ends with a TimeoutError at the request's own deadline, though
    the connection's one timer was armed for the earlier request (it moves on to this one's):
    never before the deadline, never never. The connection is dropped, not pooled, and the late
    answer reaches nobody."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            assert await _send_now(up, "/x", b"a", timeout=0.5) == (200, [(b"content-type", b"text/plain"),
                                                                          (b"content-length", b"6")], b"echo:a")
            await asyncio.sleep(0.2)  # the next deadline is well after the timer's first one
            loop = asyncio.get_running_loop()
            started = loop.time()
            error = await _send_now(up, "/hang", b"b", timeout=0.5)
            elapsed = loop.time() - started
            idle_after = list(up._idle)
            srv.release.set()
            answer = await up.request("POST", "/y", [], b"c", timeout=5)
            await up.close()
            return error, elapsed, idle_after, answer, srv.connections
    error, elapsed, idle_after, answer, connections = run(main())
    assert isinstance(error, asyncio.TimeoutError)
    assert elapsed >= 0.49  # its own timeout, not what was left of the first request's
    assert idle_after == [] and answer[2] == b"echo:c" and connections == 2


@pytest.mark.parametrize("keep", [None, (b"content-type",)])
def test_send_now_reports_a_broken_answer_a_stale_connection_and_never_pools_a_desynced_one(keep):
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            out = {}
            for mode in ("half-answer", "drop-second", "double"):
                srv.mode = "ok"
                await up.request("POST", "/warm", [], b"", timeout=5)
                srv.mode = mode
                out[mode] = (await _send_now(up, "/x", b"z", keep=keep), list(up._idle))
                await up.close()
            return out
    out = run(main())
    broken, idle = out["half-answer"]
    assert isinstance(broken, UpstreamError) and "mid-answer" in str(broken) and idle == []
    assert out["drop-second"] == (None, [])  # closed before any byte: nothing served, the caller may resend
    (status, _, body), idle = out["double"]
    assert (status, body, idle) == (200, b"echo:z", [])  # ours is answered; the connection with the extra one is dropped


def test_send_now_keeps_the_named_headers_in_order_and_done_may_send_the_next_request_at_once():
    """`keep`: only the answer's headers of those names, in the order they came, repeated names
    kept, through an interim answer and a head cut across reads. `done` runs with the connection back in the pool: it sends the next request on it."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            got: list = []
            finished = asyncio.get_running_loop().create_future()
            keep = (b"x-a", b"content-type")

            def done(result):
                got.append(result)
                if len(got) < 3:
                    assert up.send_now("POST", "/x", [], b"%d" % len(got), 5, "m", done, keep)
                else:
                    finished.set_result(None)
            srv.mode = "split"
            assert up.send_now("POST", "/x", [], b"0", 5, "m", done, keep)
            await asyncio.wait_for(finished, 10)
            await up.close()
            return got, srv.connections
    got, connections = run(main())
    assert got == [(200, [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")], b"echo:%d" % i)
                   for i in range(3)]
    assert connections == 1


@pytest.mark.parametrize("headers", [
    [(b"x-request-id", b"a\r\nx-evil: 1")], [(b"x-bad name", b"v")], [(b"x-a: b", b"c")], [(b"x", b"\xe9")],
    [(b"", b"v")], [(b"x", b"a\nb")],
])
def test_send_now_refuses_a_header_that_could_split_before_taking_or_sending_anything(headers):
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            with pytest.raises(UnsafeRequest):
                up.send_now("POST", "/x", headers, b"", 5, "m", lambda _: None)
            ok = await _send_now(up, "/ok", headers=[(b"x-request-id", b"a b\tc")])
            await up.close()
            return srv.targets, ok[0]
    assert run(main()) == ([b"/warm", b"/ok"], 200)  # nothing of the refused request reached the server


@pytest.mark.parametrize("mode, expected", [
    ("apart", (200, [(b"content-type", b"text/plain")], b"echo:q")),  # the body over two reads
    ("chunked", (200, [(b"content-type", b"text/plain")], b"abcde")),
    ("conn-close", (200, [(b"content-type", b"text/plain")], b"ok")),  # answered, the connection not reused
    ("bare-lf", "unreadable answer"),  # refused, the connection dropped
])
def test_send_now_with_kept_headers_reads_each_answer_to_its_end(mode, expected):
    """With `keep`, an answer still ends where httptools says (the head and body in separate
    reads as MLServer writes them, chunked): the connection is reused for the next request,
    never with bytes of this answer left; one that asks to close is not reused."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            srv.mode = mode
            got = [await _send_now(up, "/x", b"q", keep=(b"content-type",)) for _ in range(1 if mode in ("conn-close", "bare-lf") else 3)]
            idle = list(up._idle)
            await up.close()
            return got, idle, srv.connections
    got, idle, connections = run(main())
    if mode == "bare-lf":
        assert isinstance(got[0], UpstreamError) and expected in str(got[0]) and idle == []
    elif mode == "conn-close":
        assert got == [expected] and idle == []
    else:
        assert got == [expected] * 3 and connections == 1


def test_send_now_keeps_only_headers_of_the_head_never_lines_of_the_body():
    """The kept headers are found in the answer's head only: a body (in the same read) whose
    bytes look like header lines gives none of them."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            srv.mode = "body-like-head"
            got = await _send_now(up, "/x", b"q", keep=(b"x-a", b"content-encoding", b"content-type"))
            await up.close()
            return got
    status, headers, body = run(main())
    assert (status, headers) == (200, [(b"content-type", b"text/plain")])
    assert body == b"echo:q\r\nX-A: from-the-body\r\ncontent-encoding: gzip\r\n"


def test_send_ready_with_a_tuple_of_headers_makes_its_lines_once_and_refuses_an_unsafe_one_every_time():
    """A head the caller has seen before (a tuple: agent.app's parse cache) is checked and joined
    once, then reused for every request with it; a tuple refused as unsafe is refused again, never
    kept, and nothing of it is sent."""
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            await up.request("POST", "/warm", [], b"", timeout=5)
            allow = frozenset((b"x-request-id", b"content-type"))
            bad = ((b"x-request-id", b"a\r\nx-evil: 1"),)
            for _ in range(2):
                assert up.ready_now("m")
                with pytest.raises(UnsafeRequest):
                    up.send_ready("POST", "/x", bad, b"", 5, "m", lambda _: None, None, allow)
            good = ((b"host", b"client"), (b"content-type", b"text/plain"), (b"x-request-id", b"r1"))
            answers = []
            for body in (b"1", b"22"):
                got = asyncio.get_running_loop().create_future()
                assert up.ready_now("m")
                up.send_ready("POST", "/x", good, body, 5, "m", got.set_result, None, allow)
                answers.append(await asyncio.wait_for(got, 10))
            await up.close()
            return answers, srv.heads, len(up._heads)
    answers, heads, cached = run(main())
    assert [a[2] for a in answers] == [b"echo:1", b"echo:22"]
    assert heads[1:] == [b"POST /x HTTP/1.1\r\nhost: %s\r\ncontent-type: text/plain\r\nx-request-id: r1\r\n"
                         b"content-length: %d\r\n\r\n" % (heads[1].split(b"host: ")[1].split(b"\r\n")[0], n)
                         for n in (1, 2)]  # the refused head never reached the server; the client's host is not sent
    assert cached == 1
