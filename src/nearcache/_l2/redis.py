"""The L2 for the threaded driver: runs the core's read path (``Sharing.load_flow``) and the
L2-aware publish script on its own Redis connections, on every topology.

Where the scripts run (see docs/guarantees.md for why):

- **Reads** go to the node the backplane's subscription is on (``backplane.placement``): the
  located server, or the primary a majority of the Sentinels names, followed as the
  subscription follows it. With Sentinel a value read there is used only if the subscription
  is still on that node after the read and its confirmations are fresh, and is kept in L1 as
  current only as of the confirmations (``ReadResult.confirmed_only``): the node that
  answered may have stopped being the primary. On a Redis Cluster a read asks the channel's
  slot for the generations and then the value's slot (:mod:`nearcache._l2.cluster`).
- **Writes** are published where the channel lives now (``locate``, again after any failure),
  with Sentinel counted only once a majority asked after the acknowledgement still names the
  primary (as the backplane's publishes); on a cluster in three steps: prepare the values'
  slots, publish on the channel's, commit the values.

Every read-path command has the short ``l2_timeout``; after a failure L2 is skipped for a
while (``Breaker``), so a Redis that is down costs one timeout, not one per miss. Publishing
keeps the connection string's timeouts: it is the outbox's delivery, retried until it works.

An L2 hit whose generations are known here is a plain ``GET`` + ``PTTL`` (:class:`PlainReads`):
one pipelined request on a connection of its own, parsed with hiredis, about a third of a
redis-py command's client time and a tenth of the read script's time in Redis (not on a
cluster, where the tags differ from node to node).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] brings it; redis-py parses otherwise
    hiredis = None  # type: ignore[assignment]

from nearcache._backplane.cluster import locate, node_kwargs
from nearcache._backplane.redis import (
    PrimaryMovedError,
    RedisBackplane,
    make_client_kwargs,
    publish_error,
)
from nearcache._backplane.wire import Wire, evalsha
from nearcache._config import Endpoint, RedisSettings
from nearcache._core import l2
from nearcache._core.codec import Key, Region
from nearcache._core.log import new_epoch
from nearcache._core.sharing import (
    Breaker,
    Fill,
    Get,
    Load,
    Loaded,
    Read,
    Release,
    Sharing,
    Wait,
    lookup,
)
from nearcache._core.topology import Placement
from nearcache._exceptions import (
    BackplaneError,
    BackplaneUnavailableError,
    ConfigurationError,
    MessageError,
)
from nearcache._l2.cluster import ClusterRouter
from nearcache._typing import Clock

__all__ = ["PlainReads", "RedisL2", "l2_client_kwargs", "reign_of"]

_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, MessageError)
if hiredis is not None:
    _ERRORS += (hiredis.HiredisError,)
_PUBLISH_ERRORS = (redis.RedisError, OSError, BackplaneError, ConfigurationError)


def l2_client_kwargs(
    settings: RedisSettings, timeout: float, endpoint: Endpoint | None = None
) -> dict[str, Any]:
    """Client arguments for the read path on ``endpoint`` (default: the connection string's
    first): the connection string's, with ``timeout`` as the command and connect timeout
    (never longer than the string's own)."""
    kwargs = (
        node_kwargs(settings, endpoint) if endpoint is not None else make_client_kwargs(settings)
    )
    kwargs["socket_timeout"] = min(timeout, kwargs.get("socket_timeout") or timeout)
    kwargs["socket_connect_timeout"] = min(timeout, kwargs.get("socket_connect_timeout") or timeout)
    return kwargs


def reign_of(placement: Placement) -> str:
    """The scripts' reign argument where ``placement`` is (see :func:`l2.reign_arg`)."""
    if placement.sharded:
        return l2.reign_arg("cluster")
    if placement.claim is not None:
        return l2.reign_arg("sentinel", placement.claim.epoch)
    return l2.reign_arg("standalone")


class _Node:
    """A client of one node, the scripts registered on it and its plain reads."""

    def __init__(self, endpoint: Endpoint | None, kwargs: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.client = redis.Redis(**kwargs)
        self.plain = PlainReads(self.client.connection_pool)
        self._scripts: dict[str, Any] = {}
        self._loaded: dict[str, bytes] = {}  # source -> SHA1 of the scripts the node has

    def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply. Once the node is known to have the script, an ``EVALSHA`` on
        a plain connection (:class:`PlainReads`); the first call, and the next after the node
        lost its scripts (a restart, ``SCRIPT FLUSH``), through redis-py, which loads it."""
        sha = self._loaded.get(source)
        if sha is not None:
            reply = self.plain.call(evalsha(sha, keys, args))
            if not isinstance(reply, Exception):
                return reply
            if not str(reply).startswith("NOSCRIPT"):
                raise redis.ResponseError(str(reply))
            self._loaded.pop(source, None)
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        reply = script(keys=keys, args=args)
        if self.plain.fast:
            self._loaded[source] = script.sha.encode()
        return reply

    def send(
        self,
        source: str,
        keys: Sequence[str],
        args: Sequence[Any],
        on_reply: Callable[[Any], None],
    ) -> bool:
        """Send the script without waiting for its reply, which ``on_reply`` gets later (an
        exception instance if Redis answered with an error); False, and nothing sent, if the
        node is not known to have the script (the caller then uses :meth:`run`)."""
        sha = self._loaded.get(source)
        if sha is None:
            return False
        loaded = self._loaded

        def answered(reply: Any) -> None:
            if isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT"):
                loaded.pop(source, None)
            on_reply(reply)

        self.plain.send(evalsha(sha, keys, args), answered)
        return True


class _Slot:
    """A kept connection, its reply parser and the callbacks of the replies not read yet."""

    __slots__ = ("conn", "pending", "reader")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.reader = hiredis.Reader() if hiredis is not None else None
        self.pending: deque[Callable[[Any], None]] = deque()


class PlainReads:
    """Plain requests on connections taken from ``pool`` and kept (a list used as a lock-free
    stack: each thread takes one, or opens another): ``GET`` and ``PTTL`` of one key,
    pipelined, and the read path's scripts. Replies are parsed by a hiredis reader of their
    own, past redis-py's per-command machinery. A request may be sent without waiting for its
    reply (:meth:`send`: an L2 fill): the reply is read, and handed to its callback, before
    that connection's next reply, or by :meth:`settle`. Any failure drops the connection
    (with the replies not read yet); the pool's disconnect (the client's close) closes the
    kept ones."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[_Slot] = []
        self.closed = False
        self.fast = hiredis is not None  # call() and send() need hiredis

    def get(self, name: str) -> tuple[bytes | None, int]:
        """The record stored under ``name`` (None if there is none) and its PTTL in ms."""
        raw = name.encode()
        request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n*2\r\n$4\r\nPTTL\r\n$%d\r\n%s\r\n" % (
            len(raw), raw, len(raw), raw,
        )  # fmt: skip
        slot = self._take()
        kept = False
        try:
            sock = self._send(slot, request)
            if slot.reader is None:  # pragma: no cover - without hiredis
                record, pttl = slot.conn.read_response(), slot.conn.read_response()
            else:
                record, pttl = _reply(sock, slot.reader), _reply(sock, slot.reader)
            if not (record is None or isinstance(record, bytes)) or type(pttl) is not int:
                raise redis.ResponseError(f"unexpected reply to GET/PTTL: {record!r}, {pttl!r}")
            kept = not self.closed
            return record, pttl
        finally:
            self._give_back(slot, kept)

    def call(self, request: bytes) -> Any:
        """Send one command (RESP bytes) and return its reply; an error reply is returned as
        an exception instance, not raised (the connection stays usable)."""
        slot = self._take()
        kept = False
        try:
            reply = _reply(self._send(slot, request), slot.reader)
            kept = not self.closed
            return reply
        finally:
            self._give_back(slot, kept)

    def send(self, request: bytes, on_reply: Callable[[Any], None]) -> None:
        """Send one command (RESP bytes); ``on_reply`` gets its reply when it is read."""
        slot = self._take()
        kept = False
        try:
            self._send(slot, request)
            slot.pending.append(on_reply)
            kept = not self.closed
        finally:
            self._give_back(slot, kept)

    def settle(self) -> None:
        """Read the replies still unread on the idle connections (hand each to its callback).
        Every connection taken is given back or dropped; then the first failure is raised."""
        taken: list[_Slot] = []
        idle = self._idle
        try:
            while idle:  # (another thread may take the last one between the test and the pop)
                taken.append(idle.pop())
        except IndexError:
            pass
        failure: BaseException | None = None
        for slot in taken:
            kept = False
            try:
                if slot.pending:
                    self._drain(self._socket(slot), slot)
                kept = not self.closed
            except BaseException as exc:  # dropped below; the others still go back
                failure = failure or exc
            finally:
                self._give_back(slot, kept)
        if failure is not None:
            raise failure

    def _take(self) -> _Slot:
        try:
            return self._idle.pop()
        except IndexError:
            return _Slot(self._pool.get_connection())

    def _give_back(self, slot: _Slot, kept: bool) -> None:
        if kept:
            self._idle.append(slot)
        else:  # failed, or closed meanwhile: nothing may stay open
            slot.conn.disconnect()
            self._pool.release(slot.conn)

    @staticmethod
    def _socket(slot: _Slot) -> Any:
        sock = slot.conn._sock
        if sock is None:
            raise redis.ConnectionError("the L2 connection is closed")
        return sock

    def _send(self, slot: _Slot, request: bytes) -> Any:
        """Send ``request`` on the slot's connection, then read the replies of the requests
        sent before it (they come first); return the socket."""
        sock = self._socket(slot)
        if slot.reader is None:  # pragma: no cover - without hiredis
            slot.conn.send_packed_command([request], check_health=False)
        else:
            sock.sendall(request)
            if slot.pending:
                self._drain(sock, slot)
        return sock

    @staticmethod
    def _drain(sock: Any, slot: _Slot) -> None:
        pending = slot.pending
        while pending:
            reply = _reply(sock, slot.reader)
            pending.popleft()(reply)


def _reply(sock: Any, reader: Any) -> Any:
    """The next reply on ``sock`` (parsed by ``reader``, fed as needed). RESP3 pushes the
    server may send on any connection (maintenance notifications) are skipped: they answer
    no request, and taking one for a reply would put every later reply one request late."""
    while True:
        reply = reader.gets()
        while reply is False:
            _feed(sock, reader)
            reply = reader.gets()
        if type(reply) is not _PUSH:
            return reply


_SENT = object()  # RedisL2._run: sent, the reply comes later

_PUSH: Any = getattr(hiredis, "PushNotification", None) if hiredis is not None else None


def _feed(sock: Any, reader: Any) -> None:
    data = sock.recv(65536)
    if not data:
        raise redis.ConnectionError("the L2 connection was closed by the server")
    reader.feed(data)


class RedisL2:
    """L2 reads, fills and the publish script for one :class:`~nearcache.NearCache`."""

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        sharing: Sharing,
        *,
        clock: Clock,
        log_length: int,
        usable: Callable[[], bool],
        backplane: RedisBackplane,
        current: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._sharing = sharing
        self._clock = clock
        self._log_length = log_length
        self._usable = usable
        self._backplane = backplane
        self._current = current  # L1's confirmations are fresh now
        options = sharing.options
        # Reads go through L2 only with l2=True (propagate="update" alone only publishes here).
        self.reads = sharing.l2
        self._lease_ttl = options.l2_lease_ttl
        self._timeout = options.l2_timeout
        self._reader: _Node | None = None  # on the subscription's node
        self._publisher: _Node | None = None  # on the node the last publish went to
        self._publish_placement: Placement | None = None  # None: locate before publishing
        # The publishing connection on the publisher's node: a caller may write a batch on it
        # itself, without blocking (not on a cluster, where a write takes three steps).
        self._wire: Wire | None = None
        self._written: Placement | None = None  # where a caller's write_nowait went
        self._probes: set[redis.Redis] = set()
        self._read_router: ClusterRouter | None = None
        self._write_router: ClusterRouter | None = None
        self._breaker = Breaker()
        self._breaker_lock = threading.Lock()
        self._nodes_lock = threading.Lock()
        self._closed = False

    def _read_node(self, placement: Placement) -> _Node:
        with self._nodes_lock:
            node = self._reader
            if node is None or node.endpoint != placement.endpoint:
                if node is not None:
                    node.plain.closed = True
                    node.client.close()  # a read still on it fails: counted, as any L2 error
                kwargs = l2_client_kwargs(self._settings, self._timeout, placement.endpoint)
                node = self._reader = _Node(placement.endpoint, kwargs)
            return node

    def _router(self, *, write: bool) -> ClusterRouter:
        with self._nodes_lock:
            router = self._write_router if write else self._read_router
            if router is None:
                settings, timeout = self._settings, self._timeout
                if write:
                    router = self._write_router = ClusterRouter(
                        settings, lambda e: node_kwargs(settings, e)
                    )
                else:
                    router = self._read_router = ClusterRouter(
                        settings, lambda e: l2_client_kwargs(settings, timeout, e)
                    )
            return router

    # -- the read path ----------------------------------------------------------------------

    def load(
        self,
        key: Key,
        region: Region,
        factory: Callable[[], Any],
        ttl: float | None,
        is_open: Callable[[], bool],
        reservation: Any = None,
        dropped: bool = False,
    ) -> Loaded:
        """Run the read path for one missed key: L2, lease, wait, factory, fill.
        ``reservation``: the load's claim in L1, lowered to what a plain read is current as
        of (see :class:`~nearcache._core.sharing.Get`). ``dropped``: an invalidation dropped
        the key here, so L2 most likely holds no value: no plain read first."""
        placement = self._backplane.placement
        plain = (
            reservation is not None
            and not dropped
            and placement is not None
            and not placement.sharded
        )
        flow = self._sharing.load_flow(
            key, region, l2.new_token(), ttl, plain=plain, looking=factory is lookup
        )
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(send) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            send = None
            if type(step) is Get:
                reservation.started = min(reservation.started, step.as_of)
                send = self._get(key, region)
            elif type(step) is Read:
                send = self._read(key, region, step.token)
            elif type(step) is Load:
                try:
                    send = factory()
                except BaseException as exc:  # handed to the flow: it gives the lease up
                    error = exc
            elif type(step) is Wait:
                if is_open():
                    time.sleep(step.seconds)
                    send = True
            elif type(step) is Fill:
                send = self._fill(key, region, step)
            elif type(step) is Release:
                self._release(key, region, step)

    def _get(self, key: Key, region: Region) -> tuple[bytes | None, int] | None:
        if self._closed or not self._usable() or not self._breaker.available(self._clock()):
            return None
        placement = self._backplane.placement
        if placement is None or placement.sharded:
            return None
        try:
            found = self._read_node(placement).plain.get(
                l2.value_keys(placement.channel, region, key)[0]
            )
        except _ERRORS:
            self._failed()
            return None
        self._breaker.succeeded()
        if placement.claim is not None and self._backplane.placement is not placement:
            return None  # Sentinel: the subscription left that node meanwhile (see _read)
        return found

    def _read(self, key: Key, region: Region, token: str) -> l2.ReadResult | None:
        if not self._usable() or not self._breaker.available(self._clock()):
            return None
        placement = self._backplane.placement
        if placement is None:
            return None
        reign = reign_of(placement)
        if placement.sharded:
            reply = self._cluster_read(placement.channel, region, key, token, reign)
        else:
            keys, args = l2.read_call(placement.channel, region, key, token, self._lease_ttl, reign)
            reply = self._run(self._read_node(placement), l2.READ_SCRIPT, keys, args)
        if reply is None:
            return None
        try:
            result = l2.parse_read(reply)
        except MessageError:
            self._failed()
            return None
        if placement.claim is not None and result.status == l2.VALUE:
            # Sentinel: the node may no longer be the primary. Only a subscription still on it,
            # whose confirmations (each checked with a majority) are fresh, vouches for the
            # value, and only as of those confirmations.
            if self._backplane.placement is not placement or not self._current():
                return None
            result = result._replace(confirmed_only=True)
        return result

    def _cluster_read(self, channel: str, region: Region, key: Key, token: str, reign: str) -> Any:
        """The generations from the channel's slot, then the value's slot."""
        router = self._router(write=False)
        keys, args = l2.gens_call(channel, region, reign)
        tags = self._run(router, l2.GENS_SCRIPT, keys, args)
        if tags is None:
            return None
        keys, args = l2.vread_call(channel, region, key, tags, token, self._lease_ttl, reign)
        return self._run(router, l2.VREAD_SCRIPT, keys, args)

    def _fill(self, key: Key, region: Region, step: Fill) -> bool | None:
        """Store a loaded value (under the lease). Off a cluster the reply is not waited for:
        the caller returns its value one round trip sooner, and the reply is counted when it
        is read (with the connection's next reply, or by :meth:`settle`); None then."""
        placement = self._backplane.placement
        if placement is None:
            return None
        reign = None if placement.sharded else reign_of(placement)
        source, keys, args = step.script_call(placement.channel, region, key, reign)
        later = None if placement.sharded else self._filled
        reply = self._run(self._read_where(placement), source, keys, args, later)
        return None if reply is None or reply is _SENT else bool(reply)

    def _filled(self, reply: Any) -> None:
        """Count the reply to a fill sent without waiting (an error reply: the fill failed;
        the lease it held expires)."""
        if isinstance(reply, Exception):
            self._sharing.stats.l2_errors += 1
        else:
            self._sharing.fill_answered(bool(reply))

    def settle(self) -> None:
        """Wait for the replies to the fills sent without waiting (on connections not in use
        by another thread): once it returns, the values they stored are in L2."""
        node = self._reader
        if node is None or self._closed:
            return
        try:
            node.plain.settle()
        except _ERRORS:
            self._failed()

    def _release(self, key: Key, region: Region, step: Release) -> None:
        placement = self._backplane.placement
        if placement is None:
            return
        source, keys, args = step.script_call(placement.channel, region, key)
        self._run(self._read_where(placement), source, keys, args)

    def _read_where(self, placement: Placement) -> Any:
        """Where read-path scripts run: the cluster's router, or the subscription's node."""
        return self._router(write=False) if placement.sharded else self._read_node(placement)

    def _run(
        self,
        where: Any,
        source: str,
        keys: list[str],
        args: list[Any],
        later: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run a read-path script on a node or a cluster router; None (counted, breaker
        opened) if Redis failed. Once closed, None without a command: a load that outlived
        close() (its fill, its lease release) must not open a connection that nothing would
        close. With ``later`` (on a node), the script is sent without waiting when the node
        has it: _SENT, and ``later`` gets the reply when it is read."""
        if self._closed:
            return None
        try:
            if later is not None and where.send(source, keys, args, later):
                return _SENT
            reply = where.run(source, keys, args)
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                self._close_clients()
        self._breaker.succeeded()
        return reply

    def _failed(self) -> None:
        self._sharing.stats.l2_errors += 1
        with self._breaker_lock:
            self._breaker.failed(self._clock())

    # -- the write path ---------------------------------------------------------------------

    def publish(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> int:
        """Publish a batch through the L2-aware script (log, channel, L2 and generations in
        one atomic step; on a cluster: prepare, publish, commit); return the receivers of the
        last message. Raises BackplaneError."""
        try:
            if self._closed:
                raise BackplaneUnavailableError("the cache is closed")
            placement = self._publish_placement
            if placement is None:
                placement = locate(
                    self._settings, self._channel, self._backplane.sentinels, self._probes
                )
            if placement.sharded:
                reply = self._cluster_publish(placement, plans, since, sender)
            else:
                wire = self._wire_on(placement)
                wire.publish_request(self._request(wire, placement, plans, since, sender), 1)
                self._confirm(placement)
                reply = wire.replies[-1]
        except _PUBLISH_ERRORS as exc:
            error = self._publish_failed(exc)
            if error is exc:
                raise
            raise error from exc
        self._publish_placement = placement
        return self._published(reply)

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now (see ``_backplane/wire.py``): the
        publishing connection is up, with nothing outstanding, on a node located before (not
        a cluster's)."""
        wire, placement = self._wire, self._publish_placement
        return (
            not self._closed
            and wire is not None
            and placement is not None
            and not placement.sharded
            and wire.ready
        )

    def write_nowait(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> None:
        """Write :meth:`publish`'s request without blocking, from the caller's thread (after
        checking :attr:`writable`); the sender then calls :meth:`complete`."""
        wire, placement = self._wire, self._publish_placement
        assert wire is not None and placement is not None
        self._written = placement
        wire.write_request_nowait(self._request(wire, placement, plans, since, sender), 1)

    def complete(self) -> int:
        """Finish what :meth:`write_nowait` began and read its reply (in the sender); raises
        as :meth:`publish` does."""
        try:
            wire = self._wire
            if wire is None:
                raise BackplaneUnavailableError("the publishing connection is closed")
            wire.complete()
            if self._written is not None:
                self._confirm(self._written)
            reply = wire.replies[-1]
        except _PUBLISH_ERRORS as exc:
            error = self._publish_failed(exc)
            if error is exc:
                raise
            raise error from exc
        return self._published(reply)

    def _wire_on(self, placement: Placement) -> Wire:
        """The publishing connection on ``placement``'s node (a new node gets a new one)."""
        with self._nodes_lock:
            node, wire = self._publisher, self._wire
            if node is None or wire is None or node.endpoint != placement.endpoint:
                if wire is not None:
                    wire.close()
                if node is not None:
                    node.client.close()
                node = self._publisher = _Node(
                    placement.endpoint, node_kwargs(self._settings, placement.endpoint)
                )
                wire = self._wire = Wire(
                    node.client.connection_pool,
                    placement.channel,
                    self._log_length,
                    script=l2.PUBLISH_SCRIPT,
                )
            return wire

    def _request(
        self,
        wire: Wire,
        placement: Placement,
        plans: Sequence[l2.MessagePlan],
        since: tuple[bytes, str] | None,
        sender: bytes,
    ) -> bytes:
        keys, args = l2.publish_call(
            placement.channel,
            self._log_length,
            sender,
            since,
            plans,
            new_epoch(),
            reign_of(placement),
        )
        return evalsha(wire.sha, keys, args)

    def _confirm(self, placement: Placement) -> None:
        """With Sentinel, as the backplane's publishes: delivered only if a majority asked
        after the acknowledgement still names this primary; otherwise published again."""
        sentinels = self._backplane.sentinels
        if placement.claim is None or sentinels is None:
            return
        acknowledged = self._clock()
        if not sentinels.confirm(placement.claim, acknowledged, self._settings.sync_timeout):
            raise PrimaryMovedError(
                f"publish to channel {self._channel!r}: a majority of the Sentinels no longer "
                f"names {placement.endpoint} the primary; publishing again"
            )

    def _publish_failed(self, exc: Exception) -> Exception:
        """Locate again before the next publish; the error to raise."""
        self._publish_placement = None
        if isinstance(exc, BackplaneError) and not isinstance(exc, BackplaneUnavailableError):
            return exc
        return publish_error(exc, self._channel, self._settings.describe())

    def _published(self, reply: Any) -> int:
        self._sharing.stats.updates_fell_back += int(reply[3])
        return int(reply[2])

    def _cluster_publish(
        self,
        placement: Placement,
        plans: Sequence[l2.MessagePlan],
        since: tuple[bytes, str] | None,
        sender: bytes,
    ) -> Any:
        """Prepare every value's slot (delete, mark), publish on the channel's slot (the
        conflict check; the tags come back), commit every value (stored only if no other
        write of its key overlapped). See docs/guarantees.md."""
        router = self._router(write=True)
        channel, reign = placement.channel, reign_of(placement)
        writes = l2.value_writes(plans)
        token = l2.write_token(plans)
        if writes:
            router.run_all(
                [(l2.PREPARE_SCRIPT, *l2.prepare_call(channel, op, token, reign)) for op in writes]
            )
        keys, args = l2.publish_call(
            channel, self._log_length, sender, since, plans, new_epoch(), reign, split=True
        )
        reply = router.run(l2.SHARDED_PUBLISH_SCRIPT, keys, args)
        if writes:
            tags = iter(reply[4:])
            commits = [
                (
                    l2.COMMIT_SCRIPT,
                    *l2.commit_call(
                        channel,
                        op,
                        token,
                        (next(tags), next(tags)) if isinstance(op, l2.StoreValue) else None,
                        reign,
                    ),
                )
                for op in writes
            ]
            router.run_all(commits)
        return reply

    def _close_clients(self) -> None:
        with self._nodes_lock:
            nodes = [self._reader, self._publisher]
            routers = [self._read_router, self._write_router]
            wire = self._wire
        if wire is not None:
            wire.close()
        for node in nodes:
            if node is not None:
                node.plain.closed = True
                node.client.close()
        for router in routers:
            if router is not None:
                router.close()
        for probe in list(self._probes):
            probe.close()

    def close(self) -> None:
        """Release the connections."""
        self._closed = True
        self._close_clients()
