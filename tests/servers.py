"""Real-process test infrastructure: ``redis-server`` children, TLS material and a TCP proxy.

Nothing here is mocked: :class:`RedisServer` runs a real ``redis-server`` child process and
:class:`TcpProxy` is a real TCP proxy (one selector thread) that can cut, stall, refuse and
delay connections, so faults are injected at the socket level exactly as a client sees them.

Every child process is registered in a module-level set and killed at interpreter exit, so a
failing test cannot leak ``redis-server`` processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "REDIS_SERVER_ENV",
    "RedisServer",
    "ServerStartError",
    "TcpProxy",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "redis_server_binary",
    "wait_until",
]

HOST = "127.0.0.1"
REDIS_SERVER_ENV = "NEARCACHE_REDIS_SERVER"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (and for bind to 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


_port_picker = random.Random()  # its own state: a test seeding `random` must not pin ports
_ports_given: deque[int] = deque(maxlen=256)  # not handed out twice before they are bound


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    It is picked below the kernel's ephemeral range when there is room: a port the OS hands
    out for bind(0) is also the range it takes the local ports of outgoing connections from,
    so one of the many client connections a test makes (or a client reconnecting to a dead
    server's port, which can connect to itself) could take it before the server meant for it
    binds it. Nobody else takes a port outside that range by chance."""
    ephemeral = _ephemeral_ports()
    low, high = 10_000, min(ephemeral.start, 65_536) - 1
    for _ in range(100 if high - low > 1000 else 0):
        port = _port_picker.randint(low, high)
        if port in _ports_given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _ports_given.append(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        picked: int = sock.getsockname()[1]
        return picked


def port_is_bindable(port: int) -> bool:
    """Whether a listener could bind ``127.0.0.1:port`` now (SO_REUSEADDR, like redis-server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` elapses.

    Raises :class:`TimeoutError` (with ``message`` if given) when the deadline passes; the
    predicate is always evaluated at least once, and once more right at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = predicate()
    if result:
        return result
    what = message or getattr(predicate, "__name__", repr(predicate))
    raise TimeoutError(f"condition not met within {timeout:.2f}s: {what}")


def redis_server_binary() -> str | None:
    """Locate ``redis-server``: ``$NEARCACHE_REDIS_SERVER`` (path or name) wins over ``PATH``.

    Returns ``None`` when it cannot be found (an override that does not resolve also gives
    ``None``, it never silently falls back to ``PATH``).
    """
    override = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if override:
        return shutil.which(override)
    return shutil.which("redis-server")


# --------------------------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS ``redis-server`` signed by a throw-away ``trustme`` CA.

    ``ca_file`` is what clients trust (``ssl_ca_certs=`` / ``sslCaFile=``); it is also the
    server's ``tls-ca-cert-file``.  ``client_cert_file``/``client_key_file`` are a client
    certificate from the same CA, for tests that turn on ``tls-auth-clients``.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    @property
    def client_ca_file(self) -> Path:
        """The CA bundle a client should verify the server with (same as ``ca_file``)."""
        return self.ca_file


def make_tls_files(workdir: Path) -> TlsFiles:
    """Create a CA plus server (``localhost``, ``127.0.0.1``) and client certs in ``workdir``."""
    import trustme  # only TLS tests need it

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("nearcache-test-client")

    files = TlsFiles(
        ca_file=workdir / "ca.pem",
        cert_file=workdir / "server.pem",
        key_file=workdir / "server.key",
        client_cert_file=workdir / "client.pem",
        client_key_file=workdir / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    for leaf, cert_path, key_path in (
        (server, files.cert_file, files.key_file),
        (client, files.client_cert_file, files.client_key_file),
    ):
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
    return files


# --------------------------------------------------------------------------------------------
# redis-server child processes
# --------------------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        with contextlib.suppress(OSError):
            if proc.poll() is None:
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            proc.wait(timeout=5)


atexit.register(_kill_leftovers)


class ServerStartError(RuntimeError):
    """``redis-server`` did not come up; the message carries the tail of its log."""


class _PortInUseError(ServerStartError):
    pass


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class RedisServer:
    """One real ``redis-server`` child process, bound to 127.0.0.1, with no persistence.

    ``password`` sets ``requirepass`` for the ``default`` user; ``acl_users`` adds ACL users
    with full access (the first one is the identity used by :attr:`url`,
    :attr:`connection_string` and :meth:`client`); ``tls`` makes the server TLS-only on
    :attr:`port`.  The port is chosen once and kept across :meth:`restart`.  With
    ``cluster_bus=True`` the server also gets a cluster bus port (:attr:`bus_port`), chosen
    and kept the same way (port + 10000 may not exist). ``host`` is the loopback address it
    binds, is reached at and connects from (``bind-source-addr``); another than 127.0.0.1
    tells its connections apart by their source (see :meth:`TcpProxy.isolate`).
    """

    START_TIMEOUT = 10.0
    STOP_TIMEOUT = 10.0

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        acl_users: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        cluster_bus: bool = False,
        host: str = HOST,
    ) -> None:
        self.workdir = Path(workdir)
        self._host = host
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.password = password
        self.acl_users: dict[str, str] = dict(acl_users or {})
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self._binary = binary
        self._port_pinned = port is not None
        self._port = port if port is not None else free_port()
        self._bus_port = free_port() if cluster_bus else None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- identity -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def bus_port(self) -> int | None:
        """The cluster bus port (``cluster_bus=True``), else ``None``."""
        return self._bus_port

    @property
    def pid(self) -> int | None:
        """PID of the current (or last) child process; ``None`` before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def acl_user(self) -> str | None:
        """The first ACL user (the identity clients use), or ``None``."""
        return next(iter(self.acl_users), None)

    @property
    def acl_password(self) -> str | None:
        user = self.acl_user
        return None if user is None else self.acl_users[user]

    @property
    def username(self) -> str | None:
        """Username clients authenticate as (``None`` means the ``default`` user)."""
        return self.acl_user

    @property
    def client_password(self) -> str | None:
        """Password clients authenticate with: the ACL user's if any, else ``requirepass``."""
        return self.acl_password if self.acl_user is not None else self.password

    @property
    def ca_file(self) -> Path | None:
        return None if self.tls is None else self.tls.ca_file

    @property
    def url(self) -> str:
        """``redis://`` or ``rediss://`` URL with the client credentials (no query string)."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.client_password is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.client_password, safe='')}@"
        return f"{scheme}://{auth}{self._host}:{self._port}"

    @property
    def connection_string(self) -> str:
        """StackExchange.Redis-style string, e.g. ``127.0.0.1:6379,password=p,user=u``.

        TLS servers add ``ssl=True,sslCaFile=<ca path>`` (``sslCaFile`` is a nearcache
        extension).
        """
        parts = [f"{self._host}:{self._port}"]
        if self.client_password is not None:
            parts.append(f"password={self.client_password}")
        if self.username is not None:
            parts.append(f"user={self.username}")
        if self.tls is not None:
            parts += ["ssl=True", f"sslCaFile={self.tls.ca_file}"]
        return ",".join(parts)

    def client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` reaching this server; ``overrides`` win."""
        kwargs: dict[str, Any] = {
            "host": self._host,
            "port": self._port,
            "socket_connect_timeout": 5.0,
            "socket_timeout": 10.0,
            # redis-py 8 retries 10x with backoff by default, which hides injected faults.
            "retry": _no_retry(),
        }
        if self.username is not None:
            kwargs["username"] = self.username
        if self.client_password is not None:
            kwargs["password"] = self.client_password
        if self.tls is not None:
            kwargs["ssl"] = True
            kwargs["ssl_ca_certs"] = str(self.tls.ca_file)
        kwargs.update(overrides)
        return kwargs

    def client(self, **overrides: Any) -> redis.Redis:
        """A ``redis.Redis`` with the right credentials/TLS and *no* retries; close it."""
        return redis.Redis(**self.client_kwargs(**overrides))

    # -- lifecycle ------------------------------------------------------------------------

    def command_line(self) -> list[str]:
        binary = self._binary or redis_server_binary()
        if binary is None:
            raise ServerStartError(
                f"redis-server not found on PATH (set ${REDIS_SERVER_ENV} to its path)"
            )
        args = [
            binary,
            "--bind",
            self._host,
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--enable-debug-command",
            "yes",
        ]
        if self.tls is not None:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self._port),
                "--tls-cert-file",
                str(self.tls.cert_file),
                "--tls-key-file",
                str(self.tls.key_file),
                "--tls-ca-cert-file",
                str(self.tls.ca_file),
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self._port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        else:
            args += ["--protected-mode", "no"]
        for name, secret in self.acl_users.items():
            args += ["--user", name, "on", f">{secret}", "~*", "&*", "+@all"]
        if self._host != HOST:
            args += ["--bind-source-addr", self._host]
        if self._bus_port is not None:
            args += ["--cluster-port", str(self._bus_port)]
        args += list(self.extra_args)
        return args

    def start(self) -> RedisServer:
        """Launch the child and block until it answers PING (raises :class:`ServerStartError`)."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        attempts = 1 if self._port_pinned else 3
        for attempt in range(1, attempts + 1):
            # A port picked by free_port() can be grabbed by someone else before redis binds
            # it; then pick another.  A pinned port (or a restart) must never move.
            if self._launch(port_in_use_is_fatal=attempt == attempts):
                return self
            # Either port may be the one taken (the log names it): pick both again.
            self._port = free_port()
            if self._bus_port is not None:
                self._bus_port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, *, port_in_use_is_fatal: bool) -> bool:
        """Start the child; False if it died because the port was taken (and that may retry)."""
        args = self.command_line()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        with _LIVE_LOCK:
            _LIVE.add(proc)
        self._proc = proc
        try:
            self._wait_ready(proc, log_offset)
        except _PortInUseError:
            self._reap(kill=True)
            if port_in_use_is_fatal:
                raise
            return False
        except BaseException:
            self._reap(kill=True)
            raise
        return True

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_offset: int) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT
        last_error: BaseException | None = None
        while True:
            if proc.poll() is not None:
                tail = self.log_tail(since=log_offset)
                error = _PortInUseError if "Address already in use" in tail else ServerStartError
                raise error(
                    f"redis-server exited with {proc.returncode} during startup "
                    f"on port {self._port}; log tail:\n{tail}"
                )
            try:
                with self.client(socket_connect_timeout=1.0, socket_timeout=1.0) as conn:
                    conn.ping()
                    # Make sure we reached *our* child, not a stranger on a reused port.
                    reported = int(conn.info("server")["process_id"])
                if reported == proc.pid:
                    return
                last_error = RuntimeError(f"port {self._port} answered by pid {reported}")
            except (redis.RedisError, OSError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"redis-server (pid {proc.pid}, port {self._port}) did not answer PING "
                    f"within {self.START_TIMEOUT}s (last error: {last_error!r}); log tail:\n"
                    f"{self.log_tail(since=log_offset)}"
                )
            time.sleep(0.02)

    def log_tail(self, lines: int = 40, *, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                data = fh.read()
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown (SIGTERM), then reap; escalates to SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.STOP_TIMEOUT if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._reap(kill=True)
                return
        self._reap(kill=False)

    def kill(self) -> None:
        """Crash the server (SIGKILL) and reap it."""
        self._reap(kill=True)

    def _reap(self, *, kill: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait(timeout=self.STOP_TIMEOUT)
        with _LIVE_LOCK:
            _LIVE.discard(proc)

    def restart(self, *, bind_timeout: float = 10.0) -> RedisServer:
        """Stop if running, wait for the port to be free, start again on the SAME port."""
        if self.is_running():
            self.stop()
        else:
            self._reap(kill=True)
        wait_until(
            lambda: port_is_bindable(self._port),
            bind_timeout,
            message=f"port {self._port} bindable again",
        )
        pinned = self._port_pinned
        self._port_pinned = True
        try:
            return self.start()
        finally:
            self._port_pinned = pinned

    def __enter__(self) -> RedisServer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        kind = "tls" if self.tls else "tcp"
        return f"<RedisServer {kind} {self._host}:{self._port} pid={self.pid} {state}>"


# --------------------------------------------------------------------------------------------
# TCP proxy with fault injection
# --------------------------------------------------------------------------------------------

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_CHUNK = 64 * 1024
_HIGH_WATER = 1024 * 1024  # stop reading a side while this much is queued for its peer
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with SO_LINGER=0 so the peer gets a RST (ECONNRESET), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


class _Side:
    """One socket of a proxied connection plus the bytes queued to be written *to* it."""

    __slots__ = ("dead", "mask", "pending", "pending_bytes", "read_eof", "sock", "wr_shut")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending: deque[tuple[float, memoryview]] = deque()  # (due time, bytes)
        self.pending_bytes = 0
        self.read_eof = False  # the peer behind this socket sent FIN
        self.wr_shut = False  # we sent FIN to this socket
        self.dead = False  # an error was seen on this socket (while stalled)
        self.mask = 0  # events currently registered with the selector


class _Pipe:
    __slots__ = ("client", "closed", "peer", "upstream")

    def __init__(self, client: _Side, peer: str = "") -> None:
        self.client = client
        self.peer = peer  # the client's source address (see TcpProxy.isolate)
        self.upstream: _Side | None = None  # connected lazily while stalled
        self.closed = False

    def sides(self) -> tuple[_Side, ...]:
        return (self.client,) if self.upstream is None else (self.client, self.upstream)

    def other(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client


class TcpProxy:
    """A real TCP proxy on 127.0.0.1 in front of ``(target_host, target_port)``.

    One daemon thread runs a selector loop (no busy-spinning: it sleeps in ``select`` until a
    socket is ready, a delayed chunk falls due, or a control call wakes it).  Control calls
    (:meth:`cut`, :meth:`stall`, ...) are executed *on* that thread and return once applied.

    Fault semantics:

    * :meth:`cut` resets every open proxied connection now (SO_LINGER 0 on both sides, so
      the client *and* Redis see ECONNRESET); new connections are still accepted.
    * :meth:`stall` is a silent partition: nothing is closed, but every byte read from either
      side (of existing and new connections) is DISCARDED, bytes queued for delivery are
      dropped, and FIN/RST from one side is not passed on to the other.  New connections are
      accepted but not connected upstream until :meth:`resume`.
    * :meth:`resume` forwards again; the upstream of connections accepted during the stall is
      dialled now, and closes/resets that happened during the stall are delivered (as TCP
      would once the partition heals).  Bytes discarded while stalled are gone for good.
    * :meth:`refuse` makes the proxy accept and immediately reset new connections (Redis down
      behind a load balancer); existing connections are untouched.  :meth:`accept` undoes it.
    * :meth:`delay` adds latency to every forwarded chunk in both directions (order kept).
    * :meth:`isolate` resets every connection coming from one source address and refuses
      new ones from it, leaving the others alone (e.g. cut a primary off from Sentinels that
      connect from ``127.0.0.2``, while clients on ``127.0.0.1`` still reach it);
      :meth:`rejoin` undoes it. The source is the peer's address: a ``redis-server`` started
      with another ``host`` (:class:`RedisServer`) connects from it.

    ``listen_host`` is the address the proxy listens on (default 127.0.0.1); a cluster node's
    bus proxy listens on the node's own address, the one the cluster announces for it.

    A failed upstream dial (target down) resets the client connection.
    """

    CONTROL_TIMEOUT = 5.0
    CONNECT_TIMEOUT = 2.0

    def __init__(
        self, target_port: int, target_host: str = HOST, *, listen_host: str = HOST
    ) -> None:
        self.target = (target_host, target_port)
        self._listen_host = listen_host
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pipes: set[_Pipe] = set()
        self._commands: deque[tuple[Callable[[], object], threading.Event]] = deque()
        self._stopping = False
        self._closed = False
        self._stalled = False
        self._refusing = False
        self._delay = 0.0
        self._isolated: set[str] = set()
        self._connections = 0
        self._bytes_forwarded = 0
        self._accepted = 0
        self._loop_error: BaseException | None = None

    # -- public state ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._listen_host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    @property
    def connections(self) -> int:
        """Open proxied (client-side) connections, including ones held open by a stall."""
        return self._connections

    @property
    def bytes_forwarded(self) -> int:
        """Bytes delivered to either side since start (discarded bytes are not counted)."""
        return self._bytes_forwarded

    @property
    def accepted(self) -> int:
        """Connections accepted since start (including refused ones)."""
        return self._accepted

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def refusing(self) -> bool:
        return self._refusing

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._listen_host, 0))
            listener.listen(128)
            listener.setblocking(False)
            wake_r, wake_w = socket.socketpair()
        except BaseException:
            listener.close()
            raise
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(listener, _READ, "listener")
        selector.register(wake_r, _READ, "wake")
        self._listener, self._selector = listener, selector
        self._port = listener.getsockname()[1]
        self._wake_r, self._wake_w = wake_r, wake_w
        self._thread = threading.Thread(
            target=self._run, name=f"TcpProxy:{self.port}->{self.target[1]}", daemon=True
        )
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop, reset every connection, close the listener; join the thread."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"TcpProxy thread did not stop within {timeout}s")

    def __enter__(self) -> TcpProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<TcpProxy :{self._port} -> {self.target[0]}:{self.target[1]} "
            f"conns={self._connections} stalled={self._stalled} refusing={self._refusing}>"
        )

    # -- fault injection ------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every open connection now (peers see ECONNRESET); keep accepting."""
        self._control(self._do_cut)

    def stall(self) -> None:
        """Silent partition: keep sockets open but discard all bytes, both directions."""
        self._control(self._do_stall)

    def resume(self) -> None:
        """End a stall: forward again."""
        self._control(self._do_resume)

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted (existing ones unaffected)."""
        self._control(self._do_refuse)

    def accept(self) -> None:
        """Stop refusing new connections."""
        self._control(self._do_accept)

    def delay(self, seconds: float) -> None:
        """Delay each forwarded chunk by ``seconds`` (0 turns it off)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._control(lambda: self._do_delay(float(seconds)))

    def isolate(self, source_host: str) -> None:
        """Reset connections from ``source_host`` and refuse new ones from it."""
        self._control(lambda: self._do_isolate(source_host))

    def rejoin(self, source_host: str) -> None:
        """Accept connections from ``source_host`` again."""
        self._control(lambda: self._isolated.discard(source_host))

    def _do_isolate(self, source_host: str) -> None:
        self._isolated.add(source_host)
        for pipe in list(self._pipes):
            if pipe.peer == source_host:
                self._close_pipe(pipe, reset=True)

    # -- control plumbing -----------------------------------------------------------------

    def _control(self, fn: Callable[[], object]) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            if self._closed:
                raise RuntimeError("TcpProxy is closed")
            fn()  # not started yet: nothing runs concurrently
            return
        done = threading.Event()
        self._commands.append((fn, done))
        self._wake()
        if not done.wait(self.CONTROL_TIMEOUT):
            raise RuntimeError(f"TcpProxy loop did not apply control call: {self._loop_error!r}")

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full buffer = already woken
                self._wake_w.send(b"\0")

    def _run_commands(self) -> None:
        while self._commands:
            fn, done = self._commands.popleft()
            try:
                fn()
            finally:
                done.set()

    def _do_cut(self) -> None:
        for pipe in list(self._pipes):
            self._close_pipe(pipe, reset=True)

    def _do_stall(self) -> None:
        self._stalled = True
        for pipe in self._pipes:
            for side in pipe.sides():
                side.pending.clear()  # in flight = lost
                side.pending_bytes = 0

    def _do_refuse(self) -> None:
        self._refusing = True

    def _do_accept(self) -> None:
        self._refusing = False

    def _do_delay(self, seconds: float) -> None:
        self._delay = seconds

    def _do_resume(self) -> None:
        self._stalled = False
        for pipe in list(self._pipes):
            if any(side.dead for side in pipe.sides()):
                self._close_pipe(pipe, reset=True)
                continue
            if pipe.upstream is None and not self._connect_upstream(pipe):
                continue
            self._propagate_eof(pipe)

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping:
                timeout = self._update_interest()
                for key, events in selector.select(timeout):
                    if self._stopping:
                        break
                    if key.data == "listener":
                        self._accept_all()
                    elif key.data == "wake":
                        self._drain_wake()
                        self._run_commands()
                    else:
                        pipe, side = key.data
                        if pipe.closed:
                            continue
                        if events & _READ:
                            self._on_readable(pipe, side)
                        if events & _WRITE and not pipe.closed:
                            self._flush(pipe, side)
        except BaseException as exc:  # pragma: no cover - surfaced via control calls
            self._loop_error = exc
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pipe in list(self._pipes):
            self._close_pipe(pipe, reset=True)
        self._run_commands()  # release any caller that raced with close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def _update_interest(self) -> float | None:
        """(Re)register every socket for the events it needs; return the select timeout."""
        now = time.monotonic()
        next_due: float | None = None
        for pipe in self._pipes:
            for side in pipe.sides():
                mask = 0
                if not side.dead:
                    peer = pipe.other(side)
                    if not side.read_eof and (
                        self._stalled or peer is None or peer.pending_bytes < _HIGH_WATER
                    ):
                        mask |= _READ
                    if side.pending and not self._stalled:
                        due = side.pending[0][0]
                        if due <= now:
                            mask |= _WRITE
                        elif next_due is None or due < next_due:
                            next_due = due
                self._set_mask(pipe, side, mask)
        return None if next_due is None else max(0.0, next_due - now)

    def _set_mask(self, pipe: _Pipe, side: _Side, mask: int) -> None:
        if mask == side.mask:
            return
        assert self._selector is not None
        if side.mask == 0:
            self._selector.register(side.sock, mask, (pipe, side))
        elif mask == 0:
            self._selector.unregister(side.sock)
        else:
            self._selector.modify(side.sock, mask, (pipe, side))
        side.mask = mask

    def _accept_all(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE/ECONNABORTED: try again on the next wake-up
                return
            self._accepted += 1
            if self._refusing or addr[0] in self._isolated:
                _reset(sock)
                continue
            pipe = _Pipe(_Side(sock), addr[0])
            self._pipes.add(pipe)
            self._connections = len(self._pipes)
            if not self._stalled:
                self._connect_upstream(pipe)

    def _connect_upstream(self, pipe: _Pipe) -> bool:
        try:
            sock = socket.create_connection(self.target, timeout=self.CONNECT_TIMEOUT)
        except OSError:
            self._close_pipe(pipe, reset=True)
            return False
        pipe.upstream = _Side(sock)
        return True

    def _on_readable(self, pipe: _Pipe, side: _Side) -> None:
        try:
            data = side.sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._on_error(pipe, side)
            return
        if not data:
            side.read_eof = True
            if not self._stalled:
                self._propagate_eof(pipe)
            return
        peer = pipe.other(side)
        if self._stalled or peer is None:
            return  # silent partition: the bytes vanish
        peer.pending.append((time.monotonic() + self._delay, memoryview(data)))
        peer.pending_bytes += len(data)
        if self._delay == 0:
            self._flush(pipe, peer)

    def _flush(self, pipe: _Pipe, side: _Side) -> None:
        """Write every due chunk queued for ``side`` that the socket will take now."""
        if self._stalled:
            return
        now = time.monotonic()
        while side.pending and side.pending[0][0] <= now:
            due, chunk = side.pending[0]
            try:
                sent = side.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._on_error(pipe, side)
                return
            self._bytes_forwarded += sent
            side.pending_bytes -= sent
            if sent < len(chunk):
                side.pending[0] = (due, chunk[sent:])
                break
            side.pending.popleft()
        self._propagate_eof(pipe)

    def _on_error(self, pipe: _Pipe, side: _Side) -> None:
        if self._stalled:
            side.dead = True  # delivered (as a reset of the other side) on resume()
        else:
            self._close_pipe(pipe, reset=True)

    def _propagate_eof(self, pipe: _Pipe) -> None:
        """Pass a FIN on once everything before it was delivered; close when both are done."""
        if pipe.closed or pipe.upstream is None:
            return
        for src, dst in ((pipe.client, pipe.upstream), (pipe.upstream, pipe.client)):
            if src.read_eof and not dst.pending and not dst.wr_shut:
                try:
                    dst.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close_pipe(pipe, reset=True)
                    return
                dst.wr_shut = True
        if pipe.client.wr_shut and pipe.upstream.wr_shut:
            self._close_pipe(pipe, reset=False)

    def _close_pipe(self, pipe: _Pipe, *, reset: bool) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        for side in pipe.sides():
            if side.mask and self._selector is not None:
                self._selector.unregister(side.sock)
                side.mask = 0
            if reset:
                _reset(side.sock)
            else:
                side.sock.close()
        self._pipes.discard(pipe)
        self._connections = len(self._pipes)
