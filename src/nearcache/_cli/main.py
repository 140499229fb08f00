"""The ``nearcache`` command: ``demo``, ``monitor`` and ``invalidate``.

``nearcache monitor`` prints every message on a backplane channel, decoded; ``nearcache
invalidate`` publishes one invalidation as an operator; ``nearcache demo`` runs several
instance processes against a private Redis and shows them converge, live. rich (the ``cli``
extra) is optional: without it the output is plain text. Exit codes: 0 success, 1 failure
(Redis unreachable, a demo check failed), 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import textwrap
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from nearcache import __version__
from nearcache._config import RedisSettings, parse_connection_string
from nearcache._core.cache import CacheOptions
from nearcache._core.codec import Invalidation, Kind, Message, channel_name, decode, encode
from nearcache._drivers.sync import normalize_secrets
from nearcache._exceptions import (
    ConfigurationError,
    ConfigurationWarning,
    MessageError,
    NearCacheError,
)

if TYPE_CHECKING:
    import redis

    from nearcache._core.log import Envelope
    from nearcache._core.topology import Placement

__all__ = ["main"]

SECRET_ENV = "NEARCACHE_SECRET"  # noqa: S105 - a variable name, not a secret
_RATE_WINDOW = 10.0
REPLAY_LOG_DEFAULT = CacheOptions().replay_log
_RECONNECT_MAX = 2.0


class _UsageError(Exception):
    """A bad argument combination: reported like argparse errors (exit 2)."""


# --------------------------------------------------------------------------- the parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _seconds(low: float, high: float, *, allow_zero: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not (low <= value <= high) or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} seconds, got {text}")
        return value

    return parse


def _instance_count(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 26:
        raise argparse.ArgumentTypeError(f"expected 2 to 26 instances, got {value}")
    return value


_EPILOG_TOP = """\
examples:
  nearcache demo                                   # 3+1 processes, private Redis, live table
  nearcache monitor redis://127.0.0.1:6379 --channel shop
  nearcache invalidate redis://127.0.0.1:6379 --channel shop --key 42 --region products

Connection strings are StackExchange.Redis strings ("host:6380,password=...,ssl=True") or
redis://, rediss:// and unix:// URLs. Run "nearcache COMMAND --help" for each command.
"""

_EPILOG_DEMO = """\
what it shows:
  1. every instance reads product 42: A from SQLite, the others from the shared L2 (Redis),
     then each from its own L1
  2. A updates it (SQLite + set/remove + flush): the others drop it; latency measured
  3. the next read elsewhere returns the new version
  4. clear_region("prices")  5. clear()
  then random reads and updates for --duration seconds; a late instance joins and warms
  from the L2 (no SQLite load), and
  6. a Redis outage (SIGKILL, restart on the same port; private Redis only): reads keep
     being served, no L1 entry outlives max_staleness, the backplanes reconnect by themselves.
     With --topology sentinel|cluster: kill -9 of the primary (or of the channel's shard
     primary) instead; every instance follows the new one by itself.
  Exit code 0 when every check passed, 1 otherwise.

examples:
  nearcache demo
  nearcache demo --instances 5 --duration 20
  nearcache demo --quiet --duration 3                 # plain log lines, for CI
  nearcache demo --redis redis://127.0.0.1:6379/0     # an existing Redis (no outage step)
  nearcache demo --topology sentinel                  # primary, replica, 3 Sentinels
  nearcache demo --topology cluster                   # 3 primaries, 3 replicas

Needs redis-server on PATH for the private Redis (apt-get install redis-server, or
brew install redis) unless --redis is given. The live table needs rich:
pip install 'nearcache[cli]'.
"""

_EPILOG_MONITOR = f"""\
output:
  one line per message: local time, sender (first 8 hex digits of its instance id),
  sequence number, the operations (key products/'42', region prices, clear) and the
  message rate over the last {_RATE_WINDOW:g} s. Malformed or foreign messages are shown as
  such. With --json, one object per line:
    {{"time", "channel", "sender", "sequence", "log_entry",
     "operations": [{{"kind", "region", "key"}}]}}
  or {{"time", "channel", "error", "size"}} for a message it cannot read. log_entry is the
  message's id in the replay log (null when it was published without the log). Status
  lines go to stderr.

examples:
  nearcache monitor redis://127.0.0.1:6379
  nearcache monitor "cache.example:6380,password=...,ssl=True" --channel shop
  nearcache monitor redis://127.0.0.1:6379 --channel shop --json --count 100 | jq .
  NEARCACHE_SECRET=s3cret nearcache monitor redis://127.0.0.1:6379 --channel shop
"""

_EPILOG_INVALIDATE = f"""\
The message is encoded like the library's own (a random sender id, sequence 1), signed
with key id k1 when a secret is given (--secret or ${SECRET_ENV}), and published through
the channel's replay log like the library does (--replay-log 0: a plain PUBLISH). The
reply is the number of subscribers Redis delivered it to.

examples:
  nearcache invalidate redis://127.0.0.1:6379 --channel shop --key 42 --region products
  nearcache invalidate redis://127.0.0.1:6379 --channel shop --key 42 --int-key
  nearcache invalidate redis://127.0.0.1:6379 --channel shop --region prices
  nearcache invalidate redis://127.0.0.1:6379 --channel shop --all
"""


def _para(text: str) -> str:
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nearcache`` command."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="nearcache",
        description=_para(
            "nearcache: in-process caches kept consistent across instances over Redis "
            "Pub/Sub. Tools to watch a backplane channel, send an invalidation, and see it all "
            "work in a live demo."
        ),
        epilog=_EPILOG_TOP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"nearcache {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run several instance processes and watch them stay consistent, live",
        description=_para(
            "Start a private Redis and N instance processes serving a product catalog from "
            "SQLite through NearCache, drive a scenario of reads, updates, clears and a Redis "
            "outage, and show counters and propagation latencies live."
        ),
        epilog=_EPILOG_DEMO,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--instances",
        type=_instance_count,
        default=3,
        metavar="N",
        help="instance processes to run (2-26, default 3)",
    )
    demo.add_argument(
        "--duration",
        type=_seconds(0, 3600, allow_zero=True),
        default=10.0,
        metavar="S",
        help="seconds of background load (random reads, updates) before the outage (default 10)",
    )
    demo.add_argument(
        "--quiet", action="store_true", help="plain log lines instead of the live display"
    )
    demo.add_argument(
        "--redis",
        metavar="CONNECTION",
        help="use this Redis instead of starting a private one (skips the outage step)",
    )
    demo.add_argument(
        "--channel", metavar="NAME", help="the logical channel (default: demo-<random>)"
    )
    demo.add_argument(
        "--max-staleness",
        type=_seconds(0.1, 5),
        default=1.0,
        metavar="S",
        help="the instances' staleness bound in seconds (0.1-5, default 1)",
    )
    demo.add_argument(
        "--topology",
        choices=("standalone", "sentinel", "cluster"),
        default="standalone",
        help="a private single server (default), Sentinel set (primary, replica, 3 Sentinels) "
        "or 3+3 Redis Cluster; on the last two step 6 is a failover instead of an outage",
    )
    demo.set_defaults(handler=_run_demo)

    monitor = commands.add_parser(
        "monitor",
        help="print every message of a backplane channel, decoded",
        description=_para(
            "Subscribe to a nearcache backplane channel and print each message decoded. "
            "Survives Redis restarts (it resubscribes, and says so)."
        ),
        epilog=_EPILOG_MONITOR,
        formatter_class=formatter,
    )
    monitor.add_argument("connection", metavar="CONNECTION", help="Redis connection string")
    _add_channel(monitor)
    monitor.add_argument("--json", action="store_true", help="one JSON object per line")
    monitor.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")
    monitor.add_argument(
        "--duration", type=_seconds(0, 10**6), metavar="S", help="stop after S seconds"
    )
    _add_secret(monitor, "verify signed messages with this secret (key id k1)")
    monitor.set_defaults(handler=_monitor)

    invalidate = commands.add_parser(
        "invalidate",
        help="publish one invalidation (a key, a region, or everything)",
        description=_para(
            "Publish one invalidation message on a backplane channel, as an operator, and "
            "report how many subscribers received it."
        ),
        epilog=_EPILOG_INVALIDATE,
        formatter_class=formatter,
    )
    invalidate.add_argument("connection", metavar="CONNECTION", help="Redis connection string")
    _add_channel(invalidate)
    invalidate.add_argument(
        "--key",
        action="append",
        metavar="K",
        help="drop this key (repeat for several keys in one message)",
    )
    invalidate.add_argument(
        "--region",
        metavar="R",
        help="the key's region; alone: drop the whole region (default: the default region)",
    )
    invalidate.add_argument("--all", action="store_true", help="drop everything")
    invalidate.add_argument(
        "--int-key", action="store_true", help="send the keys as ints, not strings"
    )
    invalidate.add_argument(
        "--replay-log",
        type=_non_negative_int,
        default=REPLAY_LOG_DEFAULT,
        metavar="N",
        help="the fleet's replay_log setting: the message goes through that Redis log, so "
        "that instances reconnecting right now replay it; 0: a plain PUBLISH "
        f"(default {REPLAY_LOG_DEFAULT:,}, the library's default)",
    )
    _add_secret(invalidate, "sign the message with this secret (key id k1)")
    invalidate.set_defaults(handler=_invalidate)
    return parser


def _add_channel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel",
        default="default",
        metavar="NAME",
        help="the logical channel, as given to NearCache(channel=...) (default: default); "
        "the connection string's channelPrefix applies",
    )


def _add_secret(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--secret",
        default=os.environ.get(SECRET_ENV) or None,
        metavar="S",
        help=f"{text}; default ${SECRET_ENV}, which keeps it out of the process list",
    )


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nearcache`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = handler(args)
    except ConfigurationError as exc:
        _error(f"invalid connection string or option: {exc}")
        return 2
    except _UsageError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        print("\nnearcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``nearcache monitor | head``): stop quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


def _error(text: str) -> None:
    print(f"nearcache: error: {text}", file=sys.stderr)


def _settings(connection: str) -> RedisSettings:
    """Parse a connection string, showing its warnings as one line each (not as tracebacks)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigurationWarning)
        settings = parse_connection_string(connection)
    for warning in caught:
        print(f"nearcache: warning: {warning.message}", file=sys.stderr)
    return settings


def _locate(settings: RedisSettings, wire: str) -> tuple[redis.Redis, Placement]:
    """A client of the node in charge of ``wire`` (standalone, the Sentinels' primary or the
    cluster shard's primary) and where that is; raises redis or nearcache errors."""
    import redis

    from nearcache._backplane.cluster import locate, node_kwargs
    from nearcache._backplane.sentinel import SentinelResolver

    resolver = SentinelResolver(settings) if settings.sentinel else None
    try:
        placement = locate(settings, wire, resolver)
    finally:
        if resolver is not None:
            resolver.close()
    return redis.Redis(**node_kwargs(settings, placement.endpoint)), placement


# --------------------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    from nearcache._cli.demo.scenario import DemoOptions, DemoSetupError, run_demo

    if args.redis is not None:
        _settings(args.redis)  # a bad string is a usage error, before anything starts
        if args.topology != "standalone":
            _error("--topology starts a private topology: give it without --redis")
            return 2
    options = DemoOptions(
        instances=args.instances,
        duration=args.duration,
        quiet=args.quiet,
        redis=args.redis,
        channel=args.channel,
        max_staleness=args.max_staleness,
        topology=args.topology,
    )
    try:
        return run_demo(options)
    except DemoSetupError as exc:
        _error(str(exc))
        return exc.exit_code


# --------------------------------------------------------------------------- monitor


def _key_json(key: object) -> object:
    if isinstance(key, bytes):
        return {"bytes_hex": key.hex()}
    return key


class _MonitorOutput:
    """Prints decoded messages (text, optionally styled with rich, or JSON lines)."""

    def __init__(
        self,
        channel: str,
        *,
        as_json: bool,
        secrets: dict[str, bytes],
        stream: TextIO,
    ) -> None:
        self.channel = channel
        self.as_json = as_json
        self.secrets = secrets
        self.stream = stream
        self.count = 0
        self.malformed = 0
        self.started = time.monotonic()
        self._recent: deque[float] = deque()
        self._console: Any = None
        if not as_json and stream.isatty():
            with contextlib.suppress(ImportError):
                from rich.console import Console

                self._console = Console(file=stream, highlight=False, soft_wrap=True)

    def rate(self, now: float) -> float:
        """Messages per second over the last few seconds."""
        self._recent.append(now)
        while self._recent[0] < now - _RATE_WINDOW:
            self._recent.popleft()
        return len(self._recent) / max(min(now - self.started, _RATE_WINDOW), 1.0)

    def message(self, data: bytes) -> None:
        """Decode and print one message; never raises for bad input."""
        self.count += 1
        rate = self.rate(time.monotonic())
        wall = datetime.datetime.now(datetime.timezone.utc)
        from nearcache._core.log import unwrap

        envelope: Envelope | None = None
        try:
            # Published through the replay log, a message travels in an envelope that names
            # its log entry; a bare message (no log) is the codec format itself.
            envelope = unwrap(data)
            inner = data if envelope is None else envelope.message
            message: Message | None = decode(inner, self.secrets or None)
            error = None
        except MessageError as exc:
            message, error = None, str(exc)
            self.malformed += 1
            if not self.secrets and "no secret" in error:
                error += " (pass --secret to verify it)"
        entry = None if envelope is None else str(envelope.entry)
        if self.as_json:
            record: dict[str, object] = {
                "time": wall.isoformat(timespec="milliseconds"),
                "channel": self.channel,
            }
            if message is None:
                record.update(error=error, size=len(data))
            else:
                record.update(
                    sender=message.sender.hex(),
                    sequence=message.sequence,
                    log_entry=entry,
                    operations=[
                        {
                            "kind": op.kind.name.lower(),
                            "region": op.region,
                            "key": _key_json(op.key),
                        }
                        for op in message.operations
                    ],
                )
                if message.key_id is not None:
                    record["key_id"] = message.key_id
            self._write(json.dumps(record))
            return
        clock = wall.astimezone().strftime("%H:%M:%S.%f")[:-3]
        tail = f"{rate:.1f} msg/s"
        if message is None:
            parts = [
                (clock, "dim"),
                (f"malformed ({len(data)} bytes): {error}", "bold red"),
                (tail, "dim"),
            ]
        else:
            operations = ", ".join(op.describe() for op in message.operations) or "(empty)"
            signed = f" signed {message.key_id}" if message.key_id else ""
            logged = f" log {entry}" if entry else ""
            parts = [
                (clock, "dim"),
                (message.sender.hex()[:8], "cyan"),
                (f"#{message.sequence}{signed}{logged}", "magenta"),
                (operations, "bold"),
                (tail, "dim"),
            ]
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text("  ").join(Text(text, style) for text, style in parts))
        else:
            self._write("  ".join(text for text, _ in parts))

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


def _status(text: str) -> None:
    print(f"nearcache monitor: {text}", file=sys.stderr, flush=True)


def _monitor(args: argparse.Namespace) -> int:
    import redis

    settings = _settings(args.connection)
    wire = channel_name(args.channel, settings.channel_prefix, settings.database)
    output = _MonitorOutput(
        wire, as_json=args.json, secrets=normalize_secrets(args.secret), stream=sys.stdout
    )
    deadline = None if args.duration is None else time.monotonic() + args.duration
    subscribed_once = connected = False
    delay = 0.1
    try:
        while True:
            try:
                for data in _listen(wire, settings, deadline):
                    if data is None:  # subscribed
                        what = "resubscribed (messages published meanwhile were missed)"
                        _status(
                            f"{what if subscribed_once else 'listening'} on {wire!r} at "
                            f"{settings.describe()}"
                        )
                        subscribed_once = connected = True
                        delay = 0.1
                        continue
                    output.message(data)
                    if args.count is not None and output.count >= args.count:
                        return 0
                return 0  # the duration is over
            except ConfigurationError as exc:
                _error(f"cannot subscribe on {settings.describe()}: {exc}")
                return 1
            except (redis.RedisError, OSError, NearCacheError) as exc:
                if not subscribed_once:
                    _error(f"cannot subscribe on {settings.describe()}: {exc}")
                    return 1
                if connected:  # say it once per outage, not once per attempt
                    _status(f"connection lost ({exc}); reconnecting")
                    connected = False
            if deadline is not None and time.monotonic() + delay >= deadline:
                return 0
            time.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
    finally:
        if subscribed_once:
            elapsed = time.monotonic() - output.started
            _status(f"{output.count} messages ({output.malformed} malformed) in {elapsed:.1f} s")


def _listen(wire: str, settings: RedisSettings, deadline: float | None) -> Iterator[bytes | None]:
    """Subscribe on the node in charge and yield each message's payload (``None`` once
    subscribed) until the deadline; raises redis errors when the connection is lost, and
    when the node stops being in charge (a cluster slot moved; with Sentinel, checked every
    second)."""
    from nearcache._backplane.cluster import node_kwargs
    from nearcache._backplane.shard import ShardSubscriber

    client, placement = _locate(settings, wire)
    pubsub: Any
    if placement.sharded:
        kwargs = node_kwargs(settings, placement.endpoint)
        pubsub = ShardSubscriber(kwargs, placement.channel + ":epoch")
    else:
        pubsub = client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(placement.channel)
        confirm_by = time.monotonic() + settings.connect_timeout
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now > confirm_by:
                raise TimeoutError(f"no subscribe confirmation within {settings.connect_timeout}s")
            wait = confirm_by - now if deadline is None else min(confirm_by, deadline) - now
            message = pubsub.get_message(timeout=wait)
            if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                break
        yield None
        while True:
            wait = 1.0 if deadline is None else min(deadline - time.monotonic(), 1.0)
            if wait <= 0:
                return
            message = pubsub.get_message(timeout=wait)
            if message is None:
                if placement.claim is not None and _locate_again(settings, wire) != placement:
                    raise OSError("the Sentinels name another primary")
                continue
            if message["type"] in ("message", "smessage"):
                yield bytes(message["data"])
            elif message["type"] in ("unsubscribe", "sunsubscribe"):
                raise OSError("the server ended the subscription")
    finally:
        with contextlib.suppress(Exception):
            pubsub.close()
        client.close()


def _locate_again(settings: RedisSettings, wire: str) -> Placement:
    client, placement = _locate(settings, wire)
    client.close()
    return placement


# --------------------------------------------------------------------------- invalidate


def _operations(args: argparse.Namespace) -> list[Invalidation]:
    if args.all:
        if args.key or args.region is not None:
            raise _UsageError("--all drops everything: give it without --key or --region")
        if args.int_key:
            raise _UsageError("--int-key needs --key")
        return [Invalidation(Kind.CLEAR)]
    if not args.key:
        if args.int_key:
            raise _UsageError("--int-key needs --key")
        if args.region is None:
            raise _UsageError("say what to drop: --key K [--region R], --region R, or --all")
        return [Invalidation(Kind.REGION, args.region)]
    keys: list[str | int] = []
    for key in args.key:
        if args.int_key:
            try:
                keys.append(int(key))
            except ValueError:
                raise _UsageError(f"--int-key: {key!r} is not an integer") from None
        else:
            keys.append(key)
    return [Invalidation(Kind.KEY, args.region, key) for key in keys]


def _invalidate(args: argparse.Namespace) -> int:
    import redis

    operations = _operations(args)
    settings = _settings(args.connection)
    wire = channel_name(args.channel, settings.channel_prefix, settings.database)
    secrets = normalize_secrets(args.secret)
    signing = next(iter(secrets.items()), None)
    sender = os.urandom(16)
    payload = encode(sender, 1, operations, signing_key=signing)
    try:
        client, placement = _locate(settings, wire)
    except (redis.RedisError, OSError, NearCacheError) as exc:
        _error(f"cannot publish on {settings.describe()}: {exc}")
        return 1
    try:
        from nearcache._backplane.redis import publish_messages

        receivers = publish_messages(
            client, placement.channel, [payload], args.replay_log, sharded=placement.sharded
        )
    except (redis.RedisError, OSError) as exc:
        _error(f"cannot publish on {settings.describe()}: {exc}")
        return 1
    finally:
        client.close()
    what = ", ".join(op.describe() for op in operations)
    signed = f", signed with key id {signing[0]}" if signing else ""
    print(
        f"published {what} on {wire!r} at {settings.describe()} "
        f"(sender {sender.hex()[:8]}, sequence 1{signed}): "
        f"delivered to {receivers} subscriber{'s' if receivers != 1 else ''}"
    )
    if receivers == 0:
        print(
            "nearcache: note: no subscriber received it; check --channel and the connection "
            "string's channelPrefix",
            file=sys.stderr,
        )
    return 0
