"""The L2's plain connections (``nearcache._l2.redis.PlainReads``) on a real Redis: replies
read later, failures while reading them, and RESP3 pushes that answer no request."""

from __future__ import annotations

import socket
from typing import Any

import hiredis
import pytest
import redis

from nearcache._l2.redis import PlainReads, _reply
from tests.servers import RedisServer


def test_a_push_between_replies_is_skipped() -> None:
    """A RESP3 push (a maintenance notification the server may send on any connection) is
    not taken for the reply of the request before it."""
    reader = hiredis.Reader()
    reader.feed(b">3\r\n$6\r\nMOVING\r\n:1\r\n:15\r\n:7\r\n")
    assert _reply(None, reader) == 7
    assert reader.gets() is False


def test_settle_gives_every_connection_back_when_one_fails(redis_server: RedisServer) -> None:
    """Two connections each wait for a reply; one is cut. settle() raises for it, drops it,
    and still reads the other's reply and keeps that connection."""
    client = redis.Redis(port=redis_server.port)
    plain = PlainReads(client.connection_pool)
    try:
        answered: list[Any] = []
        cut, good = plain._take(), plain._take()
        # The cut one waits for a reply that cannot come: its socket is shut down (no request
        # was sent on it, so nothing is buffered and the read fails at once).
        cut.pending.append(answered.append)
        cut.conn._sock.shutdown(socket.SHUT_RDWR)
        plain._give_back(cut, True)  # first in the list: the old settle() read it first
        plain._send(good, b"*1\r\n$4\r\nPING\r\n")
        good.pending.append(answered.append)
        plain._give_back(good, True)
        with pytest.raises((redis.ConnectionError, OSError)):
            plain.settle()
        assert answered == [b"PONG"]  # the other one's reply was read
        assert len(plain._idle) == 1 and plain._idle[0] is not cut
        assert plain.get("missing-key") == (None, -2)  # and it still works
    finally:
        client.close()
