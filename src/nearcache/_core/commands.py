"""What the I/O-free flows ask their Redis shell to do, and how its failures come back.

A flow (the subscription in ``_core/subscription.py``, a publish in ``_core/log.py``) is a
generator that yields these commands and receives each one's reply, or has the failure thrown
in at the ``yield``. The threaded and the asyncio backplane each run it with one small
``execute`` (a blocking or an awaited redis-py call per command), so every decision, and its
order, is written once: the way httpx drives one ``Auth.auth_flow()`` from both its clients.

Failures come back as :class:`ConnectionLost` (no answer: the connection failed or timed out)
or :class:`ErrorReply` (Redis answered with an error), so that the core needs no redis-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "AskSentinels",
    "Call",
    "Command",
    "ConfirmPrimary",
    "ConnectionLost",
    "Disconnect",
    "ErrorReply",
    "Locate",
    "Pause",
    "Ping",
    "Pipeline",
    "Receive",
    "RunScript",
    "Subscribe",
]


# -- where the channel lives (see _core/topology.py) -------------------------------------------


class Locate(NamedTuple):
    """Find the node in charge of the channel now (asking the Sentinels, or the cluster's
    slot map) and point the subscriber and command connections at it; the reply is a
    :class:`~nearcache._core.topology.Placement`."""


class AskSentinels(NamedTuple):
    """Start a round of questions to the Sentinels (no reply awaited; the answers reach the
    placement's quorum). Nothing to do without Sentinel."""


class ConfirmPrimary(NamedTuple):
    """Ask the Sentinels and wait (at most ``timeout``) until a majority asked at or after
    ``after`` still names the placement's primary; the reply is whether one did."""

    after: float
    timeout: float


# -- on the subscriber connection ---------------------------------------------------------------


class Subscribe(NamedTuple):
    """Open a new subscriber connection and send ``SUBSCRIBE channel`` (no reply awaited: the
    confirmation arrives through :class:`Receive`)."""

    channel: str


class Receive:
    """The next pushed message (a redis-py pub/sub dict), or None after ``timeout`` seconds.

    The one command of the hot path (once per message received): a plain mutable object,
    so that the listen loop reuses one instead of building a tuple per message."""

    __slots__ = ("timeout",)

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Receive(timeout={self.timeout!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is Receive and other.timeout == self.timeout

    __hash__ = None  # type: ignore[assignment]


class Ping(NamedTuple):
    """Send ``PING token`` on the subscriber connection (the pong arrives through Receive)."""

    token: str


class Disconnect(NamedTuple):
    """Close the subscriber connection, ignoring any error."""


class Pause(NamedTuple):
    """Wait ``seconds`` (a shell that is closing returns at once)."""

    seconds: float


# -- on the command connection ------------------------------------------------------------------


class Call(NamedTuple):
    """One command, by redis-py's method name with positional arguments; reply as redis-py
    returns it (``Call("xrange", (key, "-", "+", 10))``)."""

    method: str
    args: tuple[Any, ...] = ()


class RunScript(NamedTuple):
    """Run a Lua script (by its SHA, loading it first if Redis does not know it)."""

    source: str
    keys: Sequence[str]
    args: Sequence[Any]


class Pipeline(NamedTuple):
    """Several calls in one round trip (no transaction); the replies in order."""

    calls: tuple[Call, ...]


Command = (
    Subscribe
    | Receive
    | Ping
    | Disconnect
    | Pause
    | Call
    | RunScript
    | Pipeline
    | Locate
    | AskSentinels
    | ConfirmPrimary
)


class ConnectionLost(Exception):
    """A command got no answer: the connection failed, closed or timed out."""


class ErrorReply(Exception):
    """Redis answered a command with an error (``NOPERM``, ``OOM``, ``READONLY``, ...); the
    message starts with Redis's error code."""
