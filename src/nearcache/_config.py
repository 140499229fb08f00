"""Connection strings: the StackExchange.Redis form and ``redis://`` / ``redis+sentinel://`` URLs.

:func:`parse_connection_string` turns a connection string into a frozen
:class:`RedisSettings`. Parsing is pure: it does no I/O, resolves no names and opens no
connection. :meth:`RedisSettings.redis_kwargs` then gives the keyword arguments for
``redis.Redis(**kw)`` or ``redis.asyncio.Redis(**kw)``.

Two forms are accepted.

**StackExchange.Redis form** (what .NET services already have in their configuration)::

    vc.redis.cache.windows.net:6380,password=abc=,ssl=True,abortConnect=False
    10.0.0.5:6379,10.0.0.6:6379,user=app,password=s3cret,defaultDatabase=2
    [::1]:6379,connectTimeout=2000
    s1:26379,s2:26379,s3,serviceName=mymaster,password=node-pass,sentinelPassword=s-pass

- Comma-separated tokens; whitespace around a token, an option name and a value is trimmed;
  empty tokens are ignored.
- A token without ``=`` is an endpoint: ``host``, ``host:port``, ``[ipv6]``,
  ``[ipv6]:port``, a bare IPv6 address (no port; use brackets to give one), or an absolute
  path (``/run/redis.sock``, a Unix socket; nearcache extension, alone, without ``ssl``).
  Several endpoints may be listed; each may appear only once. Without ``serviceName`` they
  are Redis servers tried in order until one answers (a standalone server, or any node of a
  Redis Cluster: cluster mode is detected from the server, as StackExchange.Redis does).
  With ``serviceName`` they are Sentinels, all of which are asked who the primary is.
- When an endpoint has no port, the default is the StackExchange.Redis one: 6379, or 6380
  when ``ssl=True``, or 26379 (Sentinel) when ``serviceName`` is set.
- A token with ``=`` is ``option=value``, split on the *first* ``=`` only, so a value may
  contain ``=`` (``password=abc=`` is the password ``abc=``). Option names are
  case-insensitive. Booleans are ``true``/``false`` in any case. Each option may be given
  once.
- A value cannot contain ``,`` (StackExchange.Redis has no escaping either): a password with
  a comma must be given in URL form, percent-encoded.
- A token starting with ``$`` (a StackExchange command rename, ``$INFO=``) is accepted
  with a :class:`~nearcache.ConfigurationWarning`: nearcache cannot rename commands.

**URL form** (redis-py style)::

    redis://[[username]:password@]host[:port][/db][?option=value&...]
    rediss://...            TLS; the default port stays 6379
    unix://[[username]:password@]/path/to/redis.sock[?db=N&password=...]

- The username, password, socket path and query values are percent-decoded (``+`` is a
  literal plus, not a space). Percent-encode ``@ : / ? # & %`` in passwords.
- IPv6 hosts must be in brackets: ``redis://[::1]:6379/0``.
- The database is the path (``/2``) or ``?db=2``, not both. Query option names are
  case-insensitive, each may be given once, and an unknown one is an error.
- TLS options (``ssl_*``, ``sslHost``) need ``rediss://``.
- Several hosts may be given, comma-separated: ``redis://a:6379,b:6379/0``.

**Sentinel URL** (the form of the ``redis-sentinel-url`` convention)::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service[/db][?...]
    rediss+sentinel://...   TLS to the Sentinels and to the data nodes

- The hosts are Sentinels (default port 26379); the first path segment is the service
  (master) name, the optional second one the database. The userinfo is the data nodes'
  credentials, which the Sentinels also use unless ``sentinelUser`` / ``sentinelPassword``
  are given in the query. ``redis://s1:26379?serviceName=mymaster`` means the same.

Options (StackExchange name | URL query name | meaning; default):

======================  ============================  ==========================================
StackExchange form      URL query                     Meaning (default)
======================  ============================  ==========================================
``user``                userinfo, ``username``        ACL username (none)
``password``            userinfo, ``password``        password (none); never in repr or errors
``ssl``                 scheme ``rediss://``          TLS on/off (``false``)
``sslHost``             ``sslHost``, ``ssl_host``     expected TLS server name; see
                                                      :meth:`RedisSettings.redis_kwargs` (none)
``sslCaFile`` [1]_      ``ssl_ca_certs``              CA bundle (PEM) to trust (system store)
``sslCertFile`` [1]_    ``ssl_certfile``              client certificate (PEM) (none)
``sslKeyFile`` [1]_     ``ssl_keyfile``               client private key (PEM) (none)
``sslVerify`` [1]_      ``ssl_cert_reqs``,            ``false`` turns off certificate *and*
                        ``ssl_check_hostname``        hostname checks (``true``) [2]_
``abortConnect``        ``abortConnect``,             fail at start if Redis is unreachable
                        ``abort_connect``             (``true``)
``connectTimeout``      ``connectTimeout`` (ms),      connect timeout, **milliseconds** in the
                        ``socket_connect_timeout``    StackExchange form, seconds in
                        (s)                           ``socket_*`` (5 s)
``syncTimeout``,        ``syncTimeout`` (ms),         command timeout; if both StackExchange
``asyncTimeout``        ``socket_timeout`` (s)        options are given the larger wins (5 s)
``defaultDatabase``     path ``/N``, ``db``           database number (0)
``name``                ``name``, ``client_name``     ``CLIENT SETNAME`` value; printable ASCII
                                                      without spaces (none)
``keepAlive``           ``keepAlive``                 TCP keepalive in seconds; ``0`` or ``-1``
                                                      turns it off (60)
``channelPrefix``       ``channelPrefix``,            prefix for every Pub/Sub channel (``""``)
                        ``channel_prefix``
``serviceName``         path of ``redis+sentinel://``, the Sentinel service (master) name: the
                        ``serviceName``               endpoints are Sentinels (none)
``sentinelUser``        ``sentinelUser``,             ACL username for the Sentinels
                        ``sentinel_username``         (``user``)
``sentinelPassword``    ``sentinelPassword``,         password for the Sentinels; never shown
                        ``sentinel_password``         (``password``)
``connectRetry``        ``connectRetry``              failed connection attempts after which
                                                      ``abortConnect`` gives up at start,
                                                      before ``connectTimeout`` has passed
                                                      (3; 0 means 1)
======================  ============================  ==========================================

.. [1] nearcache extension; StackExchange.Redis configures these in code.
.. [2] ``ssl_cert_reqs`` is ``none``, ``optional`` or ``required`` (``optional`` means
   ``required`` on the client side). nearcache checks both the certificate and the hostname
   or neither, so ``ssl_check_hostname=false`` needs ``ssl_cert_reqs=none``.

StackExchange.Redis options with no meaning in nearcache are accepted with a
:class:`~nearcache.ConfigurationWarning` naming them: ``allowAdmin``,
``checkCertificateRevocation``, ``configChannel``, ``configCheckSeconds``,
``heartbeatConsistencyChecks``, ``heartbeatInterval``, ``highIntegrity``,
``highPrioritySocketThreads``, ``includeDetailInExceptions``,
``includePerformanceCountersInExceptions``, ``libraryName``, ``preserveAsyncOrder``,
``protocol``, ``proxy``, ``resolveDns``, ``responseTimeout``, ``setlib``, ``sslProtocols``,
``tieBreaker``, ``tunnel``, ``version``, ``writeBuffer``.

Anything else that is wrong (an unknown option or URL scheme, a bad value, a port outside
1..65535, an empty host, no endpoint, a repeated option or endpoint, an empty string, Sentinel
credentials without a service name, a service name with a Unix socket) raises
:class:`~nearcache.ConfigurationError`; its ``option`` attribute names the offending option
and its message never contains the password.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from nearcache._exceptions import ConfigurationError, ConfigurationWarning

__all__ = ["Endpoint", "RedisSettings", "parse_connection_string"]

_DEFAULT_PORT = 6379
_DEFAULT_SSL_PORT = 6380  # StackExchange.Redis default when ssl=True and no port is given
_DEFAULT_SENTINEL_PORT = 26379

_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}", re.ASCII)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
# Bounded so int() never meets Python's limit on digits in int(str).
_INT_RE = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
_SECONDS_RE = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})", re.ASCII)
_DB_PATH_RE = re.compile(r"[0-9]{1,18}", re.ASCII)
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://", re.ASCII)


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Endpoint:
    """One Redis server address: a host name or IP address (IPv6 without brackets) and a port."""

    host: str
    port: int = _DEFAULT_PORT

    def __str__(self) -> str:
        """``host:port``, with an IPv6 address in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class RedisSettings:
    """Everything a connection string says, validated; see the module docstring for options.

    Build one with :func:`parse_connection_string`. The password never appears in ``repr()``
    or ``str()``; use :meth:`describe` for logs.
    """

    endpoints: tuple[Endpoint, ...] = ()
    unix_socket: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_host: str | None = None
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    ssl_verify: bool = True
    abort_connect: bool = True
    connect_timeout: float = 5.0
    sync_timeout: float = 5.0
    database: int = 0
    client_name: str | None = None
    keepalive: float | None = 60.0
    channel_prefix: str = ""
    service_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    connect_retry: int = 3

    @property
    def sentinel(self) -> bool:
        """Whether the endpoints are Sentinels to ask for the primary of :attr:`service_name`."""
        return self.service_name is not None

    def redis_kwargs(self, endpoint: Endpoint | None = None) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis(**kw)`` / ``redis.asyncio.Redis(**kw)``.

        ``endpoint`` defaults to the first configured endpoint, or to the Unix socket when
        one is configured. The result holds ``db``, ``username``, ``password``,
        ``socket_connect_timeout``, ``socket_timeout`` and ``client_name``; then either
        ``unix_socket_path``, or ``host``, ``port`` and ``socket_keepalive`` (on/off only:
        the keepalive interval is platform-specific and left to the OS). With TLS it adds
        ``ssl=True``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, and
        ``ssl_cert_reqs="required"`` with ``ssl_check_hostname=True``, or ``"none"`` with
        ``False`` when ``ssl_verify`` is off.

        Limitation: redis-py (checked against 8.1) always uses the host it connects to as the
        TLS server name, for SNI and for the certificate hostname check, and has no option to
        use another. ``ssl_host`` therefore cannot be passed on; when it differs from an
        endpoint host, :func:`parse_connection_string` warns, and the hostname check (which
        stays on) is made against the endpoint host. Connect by the name the certificate
        carries, or turn verification off with ``sslVerify=false``.

        Raises :class:`~nearcache.ConfigurationError` when there is no endpoint at all.
        """
        kw: dict[str, Any] = {
            "db": self.database,
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.sync_timeout,
            "client_name": self.client_name,
        }
        if endpoint is None:
            if self.unix_socket is not None:
                kw["unix_socket_path"] = self.unix_socket
                return kw
            if not self.endpoints:
                raise ConfigurationError("no endpoint configured", option="endpoints")
            endpoint = self.endpoints[0]
        kw["host"] = endpoint.host
        kw["port"] = endpoint.port
        kw["socket_keepalive"] = self.keepalive is not None
        if self.ssl:
            kw["ssl"] = True
            kw["ssl_ca_certs"] = self.ssl_ca_file
            kw["ssl_certfile"] = self.ssl_cert_file
            kw["ssl_keyfile"] = self.ssl_key_file
            kw["ssl_cert_reqs"] = "required" if self.ssl_verify else "none"
            kw["ssl_check_hostname"] = self.ssl_verify
        return kw

    def sentinel_kwargs(self, endpoint: Endpoint) -> dict[str, Any]:
        """Keyword arguments for a client of the Sentinel at ``endpoint``.

        The same as :meth:`redis_kwargs` (TLS, timeouts, keepalive, client name) but with the
        Sentinel credentials (``sentinelUser`` / ``sentinelPassword``, each falling back to
        ``user`` / ``password`` as in StackExchange.Redis) and without a database.
        """
        kw = self.redis_kwargs(endpoint)
        del kw["db"]
        kw["username"] = self.sentinel_username or self.username
        kw["password"] = self.sentinel_password or self.password
        return kw

    def with_endpoint(self, endpoint: Endpoint) -> RedisSettings:
        """A copy naming just ``endpoint`` (a data node found by discovery), as a plain
        server: no Sentinel service name."""
        return replace(
            self,
            endpoints=(endpoint,),
            unix_socket=None,
            service_name=None,
            sentinel_username=None,
            sentinel_password=None,
        )

    def describe(self) -> str:
        """A one-line description safe for logs (never the password).

        For example ``redis://app@127.0.0.1:6379/0``, ``rediss://cache1.example:6380/0``,
        ``redis://a:6379,b:6379/0``, ``unix:///tmp/r.sock?db=0`` or
        ``redis+sentinel://s1:26379,s2:26379/mymaster/0``.
        """
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        if self.unix_socket is not None:
            return f"unix://{user}{quote(self.unix_socket)}?db={self.database}"
        scheme = "rediss" if self.ssl else "redis"
        hosts = ",".join(str(e) for e in self.endpoints) or "<no endpoint>"
        if self.service_name is not None:
            service = quote(self.service_name, safe="")
            return f"{scheme}+sentinel://{user}{hosts}/{service}/{self.database}"
        return f"{scheme}://{user}{hosts}/{self.database}"


def parse_connection_string(text: str) -> RedisSettings:
    """Parse a StackExchange.Redis connection string or a ``redis://``/``rediss://``/``unix://``
    URL into :class:`RedisSettings` (see the module docstring for the syntax and options).

    Pure: no I/O and no connection. Raises :class:`~nearcache.ConfigurationError` (whose
    message never contains the password) for anything invalid, and warns with
    :class:`~nearcache.ConfigurationWarning` for options accepted without effect.
    """
    if not isinstance(text, str):
        raise ConfigurationError(
            f"connection string must be a str, not {type(text).__name__}", option=None
        )
    stripped = text.strip()
    if not stripped:
        raise ConfigurationError("empty connection string")
    notes: list[str] = []
    try:
        match = _SCHEME_RE.match(stripped)
        if match is not None:
            settings = _parse_url(stripped, match.group(1), notes)
        else:
            settings = _parse_stackexchange(stripped, notes)
        _check_sentinel(settings)
    except ConfigurationError as exc:
        raise _scrub(exc, _secret_candidates(stripped)) from None
    _check_ssl_host(settings, notes)
    for note in notes:
        warnings.warn(note, ConfigurationWarning, stacklevel=2)
    return settings


# --------------------------------------------------------------------------- values


def _show(value: str) -> str:
    """``repr`` of a (non-secret) value for a message, cut to a readable length."""
    shown = repr(value)
    return shown if len(shown) <= 42 else shown[:38] + "...'"


def _bad(name: str, expected: str, value: str | None = None) -> ConfigurationError:
    got = "" if value is None else f", got {_show(value)}"
    return ConfigurationError(f"{name}: expected {expected}{got}", option=name)


def _to_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise _bad(name, "true or false", value)


def _to_int(name: str, value: str) -> int:
    if not _INT_RE.fullmatch(value):
        raise _bad(name, "an integer", value)
    return int(value)


def _to_nonneg_int(name: str, value: str) -> int:
    number = _to_int(name, value)
    if number < 0:
        raise _bad(name, "an integer >= 0", value)
    return number


def _to_milliseconds(name: str, value: str) -> float:
    number = _to_int(name, value)
    if number <= 0:
        raise _bad(name, "a positive number of milliseconds", value)
    return number / 1000.0


def _to_seconds(name: str, value: str) -> float:
    if not _SECONDS_RE.fullmatch(value) or float(value) <= 0:
        raise _bad(name, "a positive number of seconds", value)
    return float(value)


def _to_keepalive(name: str, value: str) -> float | None:
    number = _to_int(name, value)
    if number in (0, -1):
        return None
    if number < 0:
        raise _bad(name, "seconds > 0, or 0 or -1 for off", value)
    return float(number)


def _to_text(name: str, value: str) -> str | None:
    return value or None


def _to_raw(name: str, value: str) -> str:
    return value


def _to_secret(name: str, value: str) -> str | None:
    return value or None  # never validated, never echoed


def _to_client_name(name: str, value: str) -> str | None:
    if any(not "!" <= char <= "~" for char in value):
        raise ConfigurationError(
            f"{name}: a client name must be printable ASCII without spaces", option=name
        )
    return value or None


def _to_host_name(name: str, value: str) -> str | None:
    if not value:
        return None
    if not _valid_host(value):
        raise _bad(name, "a host name", value)
    return value


def _to_cert_reqs(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered == "none":
        return False
    if lowered in ("optional", "required"):
        return True
    raise _bad(name, "none, optional or required", value)


def _valid_host(host: str) -> bool:
    if _HOST_RE.fullmatch(host):
        return True
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- option tables


@dataclass(frozen=True)
class _Option:
    name: str  # canonical spelling: used in messages and as ConfigurationError.option
    target: str  # RedisSettings field, or a pseudo field starting with "_"
    convert: Callable[[str, str], Any]
    tls_only: bool = False  # URL form: allowed with rediss:// only


def _table(*options: _Option) -> dict[str, _Option]:
    return {option.name.lower(): option for option in options}


_SE_OPTIONS = _table(
    _Option("abortConnect", "abort_connect", _to_bool),
    _Option("asyncTimeout", "_async_timeout", _to_milliseconds),
    _Option("channelPrefix", "channel_prefix", _to_raw),
    _Option("connectRetry", "connect_retry", _to_nonneg_int),
    _Option("connectTimeout", "connect_timeout", _to_milliseconds),
    _Option("defaultDatabase", "database", _to_nonneg_int),
    _Option("keepAlive", "keepalive", _to_keepalive),
    _Option("name", "client_name", _to_client_name),
    _Option("password", "password", _to_secret),
    _Option("sentinelPassword", "sentinel_password", _to_secret),
    _Option("sentinelUser", "sentinel_username", _to_text),
    _Option("serviceName", "service_name", _to_text),
    _Option("ssl", "ssl", _to_bool),
    _Option("sslCaFile", "ssl_ca_file", _to_text),
    _Option("sslCertFile", "ssl_cert_file", _to_text),
    _Option("sslHost", "ssl_host", _to_host_name),
    _Option("sslKeyFile", "ssl_key_file", _to_text),
    _Option("sslVerify", "ssl_verify", _to_bool),
    _Option("syncTimeout", "sync_timeout", _to_milliseconds),
    _Option("user", "username", _to_text),
)

_SE_IGNORED = {
    name.lower(): name
    for name in (
        "allowAdmin",
        "checkCertificateRevocation",
        "configChannel",
        "configCheckSeconds",
        "heartbeatConsistencyChecks",
        "heartbeatInterval",
        "highIntegrity",
        "highPrioritySocketThreads",
        "includeDetailInExceptions",
        "includePerformanceCountersInExceptions",
        "libraryName",
        "preserveAsyncOrder",
        "protocol",
        "proxy",
        "resolveDns",
        "responseTimeout",
        "setlib",
        "sslProtocols",
        "tieBreaker",
        "tunnel",
        "version",
        "writeBuffer",
    )
}

_URL_OPTIONS = _table(
    _Option("db", "database", _to_nonneg_int),
    _Option("username", "username", _to_text),
    _Option("password", "password", _to_secret),
    _Option("ssl_cert_reqs", "_cert_reqs", _to_cert_reqs, tls_only=True),
    _Option("ssl_check_hostname", "_check_hostname", _to_bool, tls_only=True),
    _Option("ssl_ca_certs", "ssl_ca_file", _to_text, tls_only=True),
    _Option("ssl_certfile", "ssl_cert_file", _to_text, tls_only=True),
    _Option("ssl_keyfile", "ssl_key_file", _to_text, tls_only=True),
    _Option("sslHost", "ssl_host", _to_host_name, tls_only=True),
    _Option("ssl_host", "ssl_host", _to_host_name, tls_only=True),
    _Option("abortConnect", "abort_connect", _to_bool),
    _Option("abort_connect", "abort_connect", _to_bool),
    _Option("connectTimeout", "connect_timeout", _to_milliseconds),
    _Option("socket_connect_timeout", "connect_timeout", _to_seconds),
    _Option("syncTimeout", "sync_timeout", _to_milliseconds),
    _Option("socket_timeout", "sync_timeout", _to_seconds),
    _Option("name", "client_name", _to_client_name),
    _Option("client_name", "client_name", _to_client_name),
    _Option("channelPrefix", "channel_prefix", _to_raw),
    _Option("channel_prefix", "channel_prefix", _to_raw),
    _Option("keepAlive", "keepalive", _to_keepalive),
    _Option("connectRetry", "connect_retry", _to_nonneg_int),
    _Option("serviceName", "service_name", _to_text),
    _Option("sentinelUser", "sentinel_username", _to_text),
    _Option("sentinel_username", "sentinel_username", _to_text),
    _Option("sentinelPassword", "sentinel_password", _to_secret),
    _Option("sentinel_password", "sentinel_password", _to_secret),
)


def _lookup_key(name: str) -> str:
    # ASCII-only case folding: "\u212a" (Kelvin sign) must not turn into "k".
    return name.lower() if name.isascii() else name


# --------------------------------------------------------------------------- StackExchange form


def _parse_stackexchange(text: str, notes: list[str]) -> RedisSettings:
    values: dict[str, Any] = {}
    given: set[str] = set()
    hosts: list[tuple[str, int | None]] = []
    unix_socket: str | None = None

    for raw_token in text.split(","):
        token = raw_token.strip()
        if not token:
            continue
        key, sep, value = token.partition("=")
        if not sep:
            if token.startswith("/"):
                if unix_socket is not None or hosts:
                    raise ConfigurationError(
                        "a Unix socket cannot be combined with other endpoints",
                        option="endpoint",
                    )
                unix_socket = token
            else:
                if unix_socket is not None:
                    raise ConfigurationError(
                        "a Unix socket cannot be combined with other endpoints",
                        option="endpoint",
                    )
                hosts.append(_parse_se_endpoint(token))
            continue
        key = key.strip()
        value = value.strip()
        if not key:
            raise ConfigurationError("an option has an empty name ('=value')", option="")
        if key.startswith("$"):
            notes.append(f"{_show(key)}: command renaming is not supported by nearcache; ignored")
            continue
        lookup = _lookup_key(key)
        ignored = _SE_IGNORED.get(lookup)
        if ignored is not None:
            notes.append(f"{ignored}: option has no effect in nearcache; ignored")
            continue
        option = _SE_OPTIONS.get(lookup)
        if option is None:
            raise ConfigurationError(f"unknown option {_show(key)}", option=key)
        if option.name in given:
            raise ConfigurationError(
                f"{option.name}: option given more than once", option=option.name
            )
        given.add(option.name)
        values[option.target] = option.convert(option.name, value)

    async_timeout = values.pop("_async_timeout", None)
    if async_timeout is not None:
        values["sync_timeout"] = max(async_timeout, values.get("sync_timeout", async_timeout))

    ssl = bool(values.get("ssl", False))
    if unix_socket is not None:
        if ssl:
            raise ConfigurationError("ssl: TLS is not supported over a Unix socket", option="ssl")
        if values.get("service_name"):
            raise ConfigurationError(
                "serviceName: Sentinels are reached over TCP, not a Unix socket",
                option="serviceName",
            )
        return RedisSettings(unix_socket=unix_socket, **values)
    if not hosts:
        raise ConfigurationError("no endpoint given (expected host[:port])", option="endpoint")
    if values.get("service_name"):
        default_port = _DEFAULT_SENTINEL_PORT
    else:
        default_port = _DEFAULT_SSL_PORT if ssl else _DEFAULT_PORT
    return RedisSettings(endpoints=_endpoints(hosts, default_port), **values)


def _parse_se_endpoint(token: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if token.startswith("["):
        inside, bracket, rest = token[1:].partition("]")
        if not bracket or not _is_ipv6(inside):
            raise ConfigurationError(
                f"endpoint {_show(token)}: expected [IPv6 address] or [IPv6 address]:port",
                option="endpoint",
            )
        if not rest:
            return inside, None
        if not rest.startswith(":"):
            raise ConfigurationError(
                f"endpoint {_show(token)}: unexpected text after ']'", option="endpoint"
            )
        return inside, _parse_port(rest[1:], token)
    if token.count(":") > 1:
        if not _is_ipv6(token):
            raise ConfigurationError(
                f"endpoint {_show(token)}: not a host:port or an IPv6 address",
                option="endpoint",
            )
        return token, None
    host, colon, port_text = token.partition(":")
    if not host:
        raise ConfigurationError(f"endpoint {_show(token)}: empty host", option="endpoint")
    if not _HOST_RE.fullmatch(host):
        raise ConfigurationError(f"endpoint {_show(token)}: invalid host name", option="endpoint")
    return host, (_parse_port(port_text, token) if colon else None)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, shown: str | None) -> int:
    """Parse a port; ``shown`` is the endpoint quoted in the message (None: quote nothing)."""
    where = "port" if shown is None else f"endpoint {_show(shown)}: port"
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ConfigurationError(f"{where} must be a number from 1 to 65535", option="port")
    return int(text)


def _endpoints(hosts: list[tuple[str, int | None]], default_port: int) -> tuple[Endpoint, ...]:
    result: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    for host, port in hosts:
        endpoint = Endpoint(host, default_port if port is None else port)
        key = (host.lower(), endpoint.port)
        if key in seen:
            raise ConfigurationError(
                f"endpoint {endpoint} is listed more than once", option="endpoint"
            )
        seen.add(key)
        result.append(endpoint)
    return tuple(result)


# --------------------------------------------------------------------------- URL form


_URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def _parse_url(text: str, scheme: str, notes: list[str]) -> RedisSettings:
    scheme = scheme.lower()
    if scheme not in _URL_SCHEMES:
        raise ConfigurationError(
            f"unsupported URL scheme {_show(scheme)}; expected redis://, rediss://, unix://, "
            "redis+sentinel:// or rediss+sentinel://",
            option="scheme",
        )
    # Messages below never quote the netloc or path: a malformed URL may have its password
    # anywhere in them.
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ConfigurationError(
            "the URL contains whitespace or control characters; percent-encode them",
            option="url",
        )
    if "#" in text:
        raise ConfigurationError(
            "the URL contains '#'; percent-encode it (as %23) in passwords", option="url"
        )
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigurationError("malformed URL", option="url") from None

    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # target -> option name that set it

    def give(target: str, name: str, value: Any) -> None:
        if target in given:
            earlier = given[target]
            what = "given more than once" if earlier == name else f"conflicts with {earlier}"
            raise ConfigurationError(f"{name}: option {what}", option=name)
        given[target] = name
        values[target] = value

    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        raw_user, _, raw_password = userinfo.partition(":")
        username = _unquote(raw_user, "username")
        password = _unquote(raw_password, "password")
        if username:
            give("username", "username", username)
        if password:
            give("password", "password", password)

    tls = scheme.startswith("rediss")
    for piece in parts.query.split("&"):
        if not piece:
            continue
        raw_key, sep, raw_value = piece.partition("=")
        key = _unquote(raw_key, "a query option name")
        if not sep:
            raise ConfigurationError(
                f"query option {_show(key)} has no value (expected name=value)", option=key
            )
        option = _URL_OPTIONS.get(_lookup_key(key))
        if option is None:
            raise ConfigurationError(f"unknown query option {_show(key)}", option=key)
        if option.tls_only and not tls:
            raise ConfigurationError(
                f"{option.name}: TLS options need the rediss:// scheme", option=option.name
            )
        value = _unquote(raw_value, option.name)
        give(option.target, option.name, option.convert(option.name, value))

    path = parts.path
    if scheme == "unix":
        if hostport:
            raise ConfigurationError(
                "a unix:// URL must not name a host; write unix:///absolute/path/to/socket",
                option="unix_socket",
            )
        socket_path = _unquote(path, "the socket path")
        if socket_path in ("", "/"):
            raise ConfigurationError("the unix:// URL has no socket path", option="unix_socket")
        return RedisSettings(unix_socket=socket_path, **values)

    if scheme.endswith("+sentinel"):
        service, _, digits = path[1:].partition("/")
        service = _unquote(service, "serviceName")
        if not service:
            raise ConfigurationError(
                "a Sentinel URL names the service in its path: "
                "redis+sentinel://host[:port][,host[:port]...]/service[/db]",
                option="serviceName",
            )
        give("service_name", "serviceName", service)
        if digits:
            if not _DB_PATH_RE.fullmatch(digits):
                raise ConfigurationError(
                    "the URL path must be /<service name>[/<database number>]", option="db"
                )
            give("database", "db", int(digits))
    elif path not in ("", "/"):
        digits = path[1:]
        if not _DB_PATH_RE.fullmatch(digits):
            raise ConfigurationError("the URL path must be /<database number>", option="db")
        give("database", "db", int(digits))

    cert_required = values.pop("_cert_reqs", None)
    check_hostname = values.pop("_check_hostname", None)
    if cert_required is False and check_hostname is True:
        raise ConfigurationError(
            "ssl_check_hostname: a hostname check needs certificate verification "
            "(ssl_cert_reqs=required)",
            option="ssl_check_hostname",
        )
    if cert_required is not False and check_hostname is False:
        raise ConfigurationError(
            "ssl_check_hostname: nearcache checks both the certificate and the hostname, or "
            "neither; use ssl_cert_reqs=none to turn off both",
            option="ssl_check_hostname",
        )
    if tls:
        values["ssl_verify"] = cert_required is not False and check_hostname is not False

    hosts = [_parse_url_hostport(piece) for piece in hostport.split(",")]
    default_port = _DEFAULT_SENTINEL_PORT if values.get("service_name") else _DEFAULT_PORT
    return RedisSettings(endpoints=_endpoints(hosts, default_port), ssl=tls, **values)


def _parse_url_hostport(hostport: str) -> tuple[str, int | None]:
    if not hostport:
        raise ConfigurationError("the URL has no host", option="host")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or not _is_ipv6(host):
            raise ConfigurationError("the URL has an invalid IPv6 address", option="host")
        if rest and not rest.startswith(":"):
            raise ConfigurationError("the URL has text after ']'", option="host")
        port_text: str | None = rest[1:] if rest else None
    else:
        host, colon, after = hostport.partition(":")
        port_text = after if colon else None
        if not host:
            raise ConfigurationError("the URL has an empty host", option="host")
        if not _HOST_RE.fullmatch(host):
            raise ConfigurationError(
                "the URL has an invalid host name (IPv6 addresses need [brackets])",
                option="host",
            )
    return host, (None if port_text is None else _parse_port(port_text, None))


def _unquote(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{what} is not valid percent-encoded UTF-8", option=what
        ) from None


# --------------------------------------------------------------------------- checks and hygiene


def _check_sentinel(settings: RedisSettings) -> None:
    """Sentinel credentials mean nothing without a service name: refuse, never ignore."""
    if settings.sentinel:
        return
    for name, value in (
        ("sentinelUser", settings.sentinel_username),
        ("sentinelPassword", settings.sentinel_password),
    ):
        if value is not None:
            raise ConfigurationError(
                f"{name}: only used with Sentinel (serviceName=, or a redis+sentinel:// URL)",
                option=name,
            )


def _check_ssl_host(settings: RedisSettings, notes: list[str]) -> None:
    if not settings.ssl or settings.ssl_host is None:
        return
    wanted = settings.ssl_host.lower()
    if any(endpoint.host.lower() != wanted for endpoint in settings.endpoints):
        notes.append(
            "sslHost: redis-py cannot send a TLS server name other than the host it connects "
            "to; SNI and the certificate hostname check use the endpoint host instead"
        )


_SECRET_OPTIONS = ("password", "sentinelpassword", "sentinel_password")


def _secret_candidates(text: str) -> list[str]:
    """Every string that might be the password, found without trusting the syntax."""
    found: list[str] = []
    for token in text.split(","):
        key, sep, value = token.partition("=")
        if sep and key.strip().lower() in _SECRET_OPTIONS:
            found.append(value.strip())
    _, sep, rest = text.partition("://")
    if sep:
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
        userinfo, at, _ = netloc.rpartition("@")
        if at:
            found.append(userinfo.partition(":")[2])
        for piece in re.split(r"[?&]", rest):
            key, sep, value = piece.partition("=")
            if sep and key.lower() in _SECRET_OPTIONS:
                found.append(value)
    decoded = [unquote(secret, errors="replace") for secret in found]
    return sorted({s for s in found + decoded if len(s) >= 4}, key=len, reverse=True)


def _scrub(exc: ConfigurationError, secrets: list[str]) -> ConfigurationError:
    """Return ``exc``, or a copy with any password text replaced by ``***``.

    Messages are built never to quote a password; this is a second line of defence for
    malformed strings (a password with an unescaped ``,`` ends up in the next token).
    """
    message = str(exc)
    option = exc.option
    cleaned = message
    for secret in secrets:
        cleaned = cleaned.replace(secret, "***")
        if option is not None:
            option = option.replace(secret, "***")
    if cleaned == message and option == exc.option:
        return exc
    return ConfigurationError(cleaned, option=option)
