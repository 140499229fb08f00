"""Unit tests for connection-string parsing (``nearcache._config``); no Redis needed."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import warnings
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
import redis.asyncio.connection
from hypothesis import given, settings
from hypothesis import strategies as st

import nearcache._config as config_module
from nearcache._config import Endpoint, RedisSettings, parse_connection_string
from nearcache._exceptions import ConfigurationError, ConfigurationWarning

MARK = "Qx7PWMARKz9"  # unique text put inside generated passwords


def parse_quietly(text: str) -> RedisSettings:
    """Parse with ConfigurationWarning silenced (for fuzzing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigurationWarning)
        return parse_connection_string(text)


# --------------------------------------------------------------------------- StackExchange form


def test_dotnet_azure_example() -> None:
    """The usual Azure Cache for Redis string parses, keeping the trailing '=' of the password."""
    s = parse_connection_string(
        "vc.redis.cache.windows.net:6380,password=abc=,ssl=True,abortConnect=False"
    )
    assert s.endpoints == (Endpoint("vc.redis.cache.windows.net", 6380),)
    assert s.password == "abc="
    assert s.ssl is True
    assert s.abort_connect is False
    assert s.ssl_verify is True
    assert s.unix_socket is None


def test_bare_host_gets_all_defaults() -> None:
    """A bare host yields port 6379 and every documented default."""
    s = parse_connection_string("localhost")
    assert s == RedisSettings(endpoints=(Endpoint("localhost", 6379),))
    assert s.connect_timeout == 5.0
    assert s.sync_timeout == 5.0
    assert s.keepalive == 60.0
    assert s.connect_retry == 3
    assert s.abort_connect is True
    assert s.database == 0
    assert s.channel_prefix == ""


def test_ssl_default_port_is_6380() -> None:
    """With ssl=True an endpoint without a port defaults to 6380, like StackExchange.Redis."""
    s = parse_connection_string("cache.example,ssl=true")
    assert s.endpoints == (Endpoint("cache.example", 6380),)


def test_ssl_option_after_or_before_endpoint_gives_same_default_port() -> None:
    """The default port is decided after all tokens, so option order does not matter."""
    assert parse_connection_string("ssl=true,h") == parse_connection_string("h,ssl=true")


def test_explicit_port_kept_with_ssl() -> None:
    """An explicit port is kept even when ssl is on."""
    s = parse_connection_string("cache.example:6379,ssl=true")
    assert s.endpoints == (Endpoint("cache.example", 6379),)


def test_service_name_defaults_to_sentinel_port() -> None:
    """With serviceName set an endpoint without a port defaults to the Sentinel port 26379."""
    s = parse_connection_string("s1,s2:5000,serviceName=mymaster")
    assert s.service_name == "mymaster"
    assert s.endpoints == (Endpoint("s1", 26379), Endpoint("s2", 5000))


def test_multiple_endpoints_keep_order() -> None:
    """Several endpoints are all kept, in the order given."""
    s = parse_connection_string("a:1, b ,10.0.0.3:7000")
    assert s.endpoints == (Endpoint("a", 1), Endpoint("b", 6379), Endpoint("10.0.0.3", 7000))


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("[::1]:6380", Endpoint("::1", 6380)),
        ("[::1]", Endpoint("::1", 6379)),
        ("::1", Endpoint("::1", 6379)),
        ("2001:db8::7", Endpoint("2001:db8::7", 6379)),
        ("[fe80::1%eth0]:7000", Endpoint("fe80::1%eth0", 7000)),
    ],
)
def test_ipv6_endpoints(text: str, endpoint: Endpoint) -> None:
    """IPv6 endpoints are accepted in brackets (with or without port) and bare (no port)."""
    assert parse_connection_string(text).endpoints == (endpoint,)


def test_whitespace_and_empty_tokens_are_ignored() -> None:
    """Whitespace around tokens, names and values is trimmed and empty tokens are skipped."""
    s = parse_connection_string("  ,h:1 ,, ssl = true ,\tpassword = p w ,  ")
    assert s.endpoints == (Endpoint("h", 1),)
    assert s.ssl is True
    assert s.password == "p w"


def test_option_names_are_case_insensitive() -> None:
    """Option names match regardless of case, and so do boolean values."""
    s = parse_connection_string("h,SSL=TRUE,ABORTCONNECT=fAlSe,DefaultDataBase=4")
    assert (s.ssl, s.abort_connect, s.database) == (True, False, 4)


@pytest.mark.parametrize(
    ("option", "field", "value", "expected"),
    [
        ("user", "username", "app", "app"),
        ("password", "password", "p@ss:w0rd", "p@ss:w0rd"),
        ("password", "password", "a=b==", "a=b=="),
        ("password", "password", "", None),
        ("ssl", "ssl", "true", True),
        ("sslHost", "ssl_host", "h", "h"),
        ("sslCaFile", "ssl_ca_file", "/etc/ca.pem", "/etc/ca.pem"),
        ("sslCertFile", "ssl_cert_file", "/etc/c.pem", "/etc/c.pem"),
        ("sslKeyFile", "ssl_key_file", "/etc/k.pem", "/etc/k.pem"),
        ("sslVerify", "ssl_verify", "false", False),
        ("abortConnect", "abort_connect", "false", False),
        ("connectTimeout", "connect_timeout", "2500", 2.5),
        ("syncTimeout", "sync_timeout", "250", 0.25),
        ("asyncTimeout", "sync_timeout", "7000", 7.0),
        ("defaultDatabase", "database", "15", 15),
        ("name", "client_name", "svc-a:1", "svc-a:1"),
        ("name", "client_name", "", None),
        ("keepAlive", "keepalive", "30", 30.0),
        ("keepAlive", "keepalive", "0", None),
        ("keepAlive", "keepalive", "-1", None),
        ("channelPrefix", "channel_prefix", "app1:", "app1:"),
        ("serviceName", "service_name", "mymaster", "mymaster"),
        ("connectRetry", "connect_retry", "0", 0),
        ("connectRetry", "connect_retry", "10", 10),
    ],
)
def test_each_stackexchange_option(option: str, field: str, value: str, expected: Any) -> None:
    """Every supported StackExchange option sets its field, converting units where needed."""
    s = parse_connection_string(f"h:1,{option}={value}")
    assert getattr(s, field) == expected


# --------------------------------------------------------------------------- Sentinel, Cluster


def test_stackexchange_sentinel_form() -> None:
    """serviceName makes the endpoints Sentinels (default port 26379), with their own
    credentials."""
    s = parse_connection_string(
        "s1:26379,s2,serviceName=mymaster,user=app,password=node,"
        "sentinelUser=watcher,sentinelPassword=spass,ssl=true,defaultDatabase=3"
    )
    assert s.sentinel
    assert s.service_name == "mymaster"
    assert s.endpoints == (Endpoint("s1", 26379), Endpoint("s2", 26379))
    assert (s.username, s.password, s.database, s.ssl) == ("app", "node", 3, True)
    kw = s.sentinel_kwargs(s.endpoints[1])
    assert (kw["host"], kw["port"], kw["username"], kw["password"]) == (
        "s2",
        26379,
        "watcher",
        "spass",
    )
    assert "db" not in kw
    assert kw["ssl"] is True


def test_sentinel_credentials_fall_back_to_user_and_password() -> None:
    """Without sentinelUser / sentinelPassword the Sentinels get user / password, as in
    StackExchange.Redis."""
    s = parse_connection_string("s1,serviceName=m,user=app,password=node")
    kw = s.sentinel_kwargs(s.endpoints[0])
    assert (kw["username"], kw["password"]) == ("app", "node")
    only_password = parse_connection_string("s1,serviceName=m,password=node,sentinelUser=w")
    kw = only_password.sentinel_kwargs(only_password.endpoints[0])
    assert (kw["username"], kw["password"]) == ("w", "node")


@pytest.mark.parametrize(
    "text",
    [
        "redis+sentinel://app:node@s1:26379,s2/mymaster/3?sentinelPassword=spass&sentinelUser=watcher",
        "redis+sentinel://app:node@s1,s2:26379/mymaster/3?sentinel_password=spass&sentinel_username=watcher",
        "redis://app:node@s1,s2/3?serviceName=mymaster&sentinelPassword=spass&sentinelUser=watcher",
        "s1,s2,serviceName=mymaster,user=app,password=node,defaultDatabase=3,"
        "sentinelPassword=spass,sentinelUser=watcher",
    ],
)
def test_sentinel_url_forms_mean_the_same(text: str) -> None:
    """redis+sentinel://hosts/service/db, redis://...?serviceName= and the StackExchange
    form give the same settings."""
    s = parse_connection_string(text)
    assert s == RedisSettings(
        endpoints=(Endpoint("s1", 26379), Endpoint("s2", 26379)),
        username="app",
        password="node",
        database=3,
        service_name="mymaster",
        sentinel_username="watcher",
        sentinel_password="spass",
    )


def test_sentinel_url_with_tls_and_no_database() -> None:
    """rediss+sentinel:// turns TLS on; the database defaults to 0; a service name may be
    percent-encoded."""
    s = parse_connection_string("rediss+sentinel://s/my%2Fmaster?ssl_ca_certs=/ca.pem")
    assert (s.ssl, s.database, s.service_name, s.ssl_ca_file) == (True, 0, "my/master", "/ca.pem")


def test_several_hosts_in_a_url_are_kept_in_order() -> None:
    """redis://a,b:2/0 lists two servers, tried in order."""
    s = parse_connection_string("redis://a,b:2,[::1]:3/0")
    assert s.endpoints == (Endpoint("a", 6379), Endpoint("b", 2), Endpoint("::1", 3))
    assert not s.sentinel


def test_with_endpoint_names_one_plain_server() -> None:
    """with_endpoint gives the settings of one discovered data node: no Sentinel left."""
    s = parse_connection_string("s1,s2,serviceName=m,password=p,sentinelPassword=q")
    node = s.with_endpoint(Endpoint("10.0.0.9", 6379))
    assert node.endpoints == (Endpoint("10.0.0.9", 6379),)
    assert not node.sentinel and node.sentinel_password is None
    assert node.password == "p"
    assert node.redis_kwargs()["host"] == "10.0.0.9"


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("h,sentinelPassword=x", "sentinelPassword"),
        ("h,sentinelUser=x", "sentinelUser"),
        ("redis://h?sentinel_password=x", "sentinelPassword"),
        ("redis://h?sentinelUser=x", "sentinelUser"),
        ("/run/redis.sock,serviceName=m", "serviceName"),
        ("redis+sentinel://h", "serviceName"),
        ("redis+sentinel://h/", "serviceName"),
        ("redis+sentinel://h/m/x", "db"),
        ("redis+sentinel://h/m/1/2", "db"),
        ("redis+sentinel://h/m/1?db=2", "db"),
        ("redis+sentinel://h/m?serviceName=n", "serviceName"),
        ("redis+sentinel://h,h:26379/m", "endpoint"),
        ("redis://a,,b", "host"),
        ("redis://a:1,a:1", "endpoint"),
        ("redis+sentinel://h/m?ssl_ca_certs=/x", "ssl_ca_certs"),
        ("unix+sentinel:///s", "scheme"),
    ],
)
def test_sentinel_and_endpoint_mistakes_are_named(text: str, option: str) -> None:
    """Sentinel options that cannot work, and malformed host lists, are refused naming the
    option, never silently ignored."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(text)
    assert info.value.option == option


def test_sync_and_async_timeout_larger_wins() -> None:
    """When both syncTimeout and asyncTimeout are given, the larger one is used."""
    assert parse_connection_string("h,syncTimeout=1000,asyncTimeout=3000").sync_timeout == 3.0
    assert parse_connection_string("h,asyncTimeout=1000,syncTimeout=3000").sync_timeout == 3.0


def test_unix_socket_endpoint_in_stackexchange_form() -> None:
    """An absolute path is a Unix socket endpoint and leaves endpoints empty."""
    s = parse_connection_string("/run/redis.sock,defaultDatabase=1")
    assert s.unix_socket == "/run/redis.sock"
    assert s.endpoints == ()
    assert s.database == 1


@pytest.mark.parametrize(
    "text",
    ["/run/r.sock,h", "h,/run/r.sock", "/a.sock,/b.sock"],
)
def test_unix_socket_cannot_mix_with_other_endpoints(text: str) -> None:
    """A Unix socket must be the only endpoint."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(text)
    assert info.value.option == "endpoint"


def test_unix_socket_with_ssl_is_rejected() -> None:
    """TLS over a Unix socket is refused, naming the ssl option."""
    with pytest.raises(ConfigurationError, match="ssl") as info:
        parse_connection_string("/run/r.sock,ssl=true")
    assert info.value.option == "ssl"


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_string_is_rejected(text: str) -> None:
    """An empty or whitespace-only string raises 'empty connection string'."""
    with pytest.raises(ConfigurationError, match="empty connection string"):
        parse_connection_string(text)


@pytest.mark.parametrize("text", [",,,", "ssl=true", "password=x,abortConnect=false"])
def test_no_endpoint_is_rejected(text: str) -> None:
    """A string with options but no endpoint is rejected."""
    with pytest.raises(ConfigurationError, match="no endpoint") as info:
        parse_connection_string(text)
    assert info.value.option == "endpoint"


def test_unknown_option_is_named() -> None:
    """An unknown option raises an error whose message and option attribute name it."""
    with pytest.raises(ConfigurationError, match="frobnicate") as info:
        parse_connection_string("h,frobnicate=1")
    assert info.value.option == "frobnicate"


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("h,ssl=maybe", "ssl"),
        ("h,ssl=", "ssl"),
        ("h,ssl=1", "ssl"),
        ("h,abortConnect=yes", "abortConnect"),
        ("h,sslVerify=no", "sslVerify"),
        ("h,connectTimeout=abc", "connectTimeout"),
        ("h,connectTimeout=-5", "connectTimeout"),
        ("h,connectTimeout=0", "connectTimeout"),
        ("h,connectTimeout=1.5", "connectTimeout"),
        ("h,syncTimeout=-1", "syncTimeout"),
        ("h,asyncTimeout=x", "asyncTimeout"),
        ("h,defaultDatabase=-1", "defaultDatabase"),
        ("h,defaultDatabase=one", "defaultDatabase"),
        ("h,defaultDatabase=1_0", "defaultDatabase"),
        ("h,defaultDatabase=\u0661", "defaultDatabase"),
        ("h,defaultDatabase=" + "9" * 5000, "defaultDatabase"),
        ("h,keepAlive=-2", "keepAlive"),
        ("h,keepAlive=ten", "keepAlive"),
        ("h,connectRetry=-1", "connectRetry"),
        ("h,name=has space", "name"),
        ("h,sslHost=not a host", "sslHost"),
        ("h:0", "port"),
        ("h:65536", "port"),
        ("h:http", "port"),
        ("h:", "port"),
        ("h:+80", "port"),
        (":6379", "endpoint"),
        ("bad host", "endpoint"),
        ("h/x", "endpoint"),
        ("[::1", "endpoint"),
        ("[nothex]:1", "endpoint"),
        ("[::1]x", "endpoint"),
        ("1:2:zz", "endpoint"),
        ("h,=value", ""),
    ],
)
def test_bad_values_raise_naming_the_option(text: str, option: str) -> None:
    """Malformed values and endpoints raise ConfigurationError with ``option`` set."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(text)
    assert info.value.option == option
    assert option in str(info.value)


def test_bad_value_message_quotes_the_value() -> None:
    """The message for a bad non-secret value shows that value."""
    with pytest.raises(ConfigurationError, match="'maybe'"):
        parse_connection_string("h,ssl=maybe")


@pytest.mark.parametrize(
    "text",
    ["h,ssl=true,ssl=true", "h,password=a,PASSWORD=b", "h,connectTimeout=1,connecttimeout=2"],
)
def test_duplicate_option_is_rejected(text: str) -> None:
    """The same option given twice (in any case) is an error."""
    with pytest.raises(ConfigurationError, match="more than once"):
        parse_connection_string(text)


@pytest.mark.parametrize("text", ["h,h", "h,H:6379", "h:6380,ssl=true,h", "[::1],::1"])
def test_duplicate_endpoint_is_rejected(text: str) -> None:
    """An endpoint listed twice (after applying the default port) is an error."""
    with pytest.raises(ConfigurationError, match="more than once") as info:
        parse_connection_string(text)
    assert info.value.option == "endpoint"


@pytest.mark.parametrize("name", sorted(config_module._SE_IGNORED.values()))
def test_stackexchange_options_without_effect_warn(name: str) -> None:
    """Known StackExchange options with no meaning here are accepted with a warning naming them."""
    with pytest.warns(ConfigurationWarning, match=name):
        s = parse_connection_string(f"h,{name.upper()}=whatever")
    assert s.endpoints == (Endpoint("h", 6379),)


def test_command_rename_warns() -> None:
    """A StackExchange command-map token ($CMD=) is accepted with a warning."""
    with pytest.warns(ConfigurationWarning) as record:
        parse_connection_string("h,$INFO=,$SELECT=use")
    messages = [str(w.message) for w in record]
    assert any("$INFO" in m for m in messages)
    assert any("$SELECT" in m for m in messages)


def test_warning_points_at_the_caller() -> None:
    """Warnings are attributed to the code calling parse_connection_string."""
    with pytest.warns(ConfigurationWarning) as record:
        parse_connection_string("h,allowAdmin=true")
    assert record[0].filename == __file__


def test_ssl_host_different_from_endpoint_warns() -> None:
    """sslHost naming another host than the endpoint warns that redis-py cannot honour it."""
    with pytest.warns(ConfigurationWarning, match="sslHost"):
        s = parse_connection_string("10.0.0.1:6380,ssl=true,sslHost=cache.example")
    assert s.ssl_host == "cache.example"


def test_ssl_host_same_as_endpoint_does_not_warn() -> None:
    """sslHost equal to every endpoint host (ignoring case) is accepted silently."""
    s = parse_connection_string("Cache.Example,ssl=true,sslHost=cache.example")
    assert s.ssl_host == "cache.example"


def test_ssl_options_without_ssl_are_ignored_quietly() -> None:
    """TLS options are stored but have no effect (and do not warn) when ssl is off."""
    s = parse_connection_string("h,sslHost=other,sslCaFile=/ca.pem")
    assert s.ssl is False
    assert "ssl" not in s.redis_kwargs()


# --------------------------------------------------------------------------- URL form


def test_plain_redis_url_defaults() -> None:
    """``redis://host`` gives port 6379, database 0 and no TLS."""
    s = parse_connection_string("redis://localhost")
    assert s == RedisSettings(endpoints=(Endpoint("localhost", 6379),))


def test_full_redis_url() -> None:
    """User, percent-encoded password, port and database are all read from a URL."""
    s = parse_connection_string("redis://app%2B1:p%40ss%3Aw%2Fd@cache.example:6390/3")
    assert s.username == "app+1"
    assert s.password == "p@ss:w/d"
    assert s.endpoints == (Endpoint("cache.example", 6390),)
    assert s.database == 3
    assert s.ssl is False


def test_url_password_only_and_user_only() -> None:
    """``:password@`` sets only the password and ``user@`` only the username."""
    s = parse_connection_string("redis://:secret@h")
    assert (s.username, s.password) == (None, "secret")
    s = parse_connection_string("redis://bob@h")
    assert (s.username, s.password) == ("bob", None)


def test_url_password_may_contain_unencoded_at_and_colon() -> None:
    """The last '@' ends the userinfo and the first ':' splits user from password."""
    s = parse_connection_string("redis://u:a:b@c@h:1")
    assert (s.username, s.password, s.endpoints) == ("u", "a:b@c", (Endpoint("h", 1),))


def test_rediss_url_turns_on_tls_keeping_port_6379() -> None:
    """``rediss://`` enables TLS with verification and the default port stays 6379."""
    s = parse_connection_string("rediss://cache.example")
    assert s.ssl is True
    assert s.ssl_verify is True
    assert s.endpoints == (Endpoint("cache.example", 6379),)


def test_url_scheme_is_case_insensitive() -> None:
    """The URL scheme matches regardless of case."""
    assert parse_connection_string("REDISS://h").ssl is True


def test_ipv6_url() -> None:
    """A bracketed IPv6 host is accepted in a URL, with or without a port."""
    assert parse_connection_string("redis://[::1]:7000/1").endpoints == (Endpoint("::1", 7000),)
    assert parse_connection_string("redis://[::1]").endpoints == (Endpoint("::1", 6379),)


def test_database_from_query() -> None:
    """``?db=N`` selects the database when the path has none."""
    assert parse_connection_string("redis://h/?db=5").database == 5
    assert parse_connection_string("redis://h?db=5").database == 5


def test_database_in_path_and_query_is_rejected() -> None:
    """Giving the database both as the path and as ``?db=`` is an error."""
    with pytest.raises(ConfigurationError, match="db") as info:
        parse_connection_string("redis://h/1?db=1")
    assert info.value.option == "db"


@pytest.mark.parametrize(
    ("query", "field", "expected"),
    [
        ("db=2", "database", 2),
        ("username=bob", "username", "bob"),
        ("password=s%26cret", "password", "s&cret"),
        ("abortConnect=false", "abort_connect", False),
        ("abort_connect=false", "abort_connect", False),
        ("connectTimeout=1500", "connect_timeout", 1.5),
        ("socket_connect_timeout=2.5", "connect_timeout", 2.5),
        ("syncTimeout=100", "sync_timeout", 0.1),
        ("socket_timeout=3", "sync_timeout", 3.0),
        ("name=svc", "client_name", "svc"),
        ("client_name=svc", "client_name", "svc"),
        ("channelPrefix=a%3A", "channel_prefix", "a:"),
        ("channel_prefix=b", "channel_prefix", "b"),
        ("keepAlive=-1", "keepalive", None),
        ("connectRetry=7", "connect_retry", 7),
        ("serviceName=m", "service_name", "m"),
        ("CLIENT_NAME=svc", "client_name", "svc"),
    ],
)
def test_each_url_query_option(query: str, field: str, expected: Any) -> None:
    """Every supported URL query option sets its field, converting units where needed."""
    s = parse_connection_string(f"redis://h:1?{query}")
    assert getattr(s, field) == expected


@pytest.mark.parametrize(
    ("query", "field", "expected"),
    [
        ("ssl_ca_certs=/etc/ca.pem", "ssl_ca_file", "/etc/ca.pem"),
        ("ssl_certfile=/c%20d.pem", "ssl_cert_file", "/c d.pem"),
        ("ssl_keyfile=/k.pem", "ssl_key_file", "/k.pem"),
        ("sslHost=h", "ssl_host", "h"),
        ("ssl_host=h", "ssl_host", "h"),
    ],
)
def test_each_url_tls_option(query: str, field: str, expected: Any) -> None:
    """Every TLS query option of a rediss:// URL sets its field."""
    assert getattr(parse_connection_string(f"rediss://h?{query}"), field) == expected


@pytest.mark.parametrize(
    ("query", "verify"),
    [
        ("", True),
        ("ssl_cert_reqs=required", True),
        ("ssl_cert_reqs=optional", True),
        ("ssl_cert_reqs=REQUIRED", True),
        ("ssl_cert_reqs=none", False),
        ("ssl_check_hostname=true", True),
        ("ssl_cert_reqs=required&ssl_check_hostname=true", True),
        ("ssl_cert_reqs=none&ssl_check_hostname=false", False),
    ],
)
def test_url_certificate_verification_mapping(query: str, verify: bool) -> None:
    """ssl_cert_reqs / ssl_check_hostname map onto ssl_verify."""
    assert parse_connection_string(f"rediss://h?{query}").ssl_verify is verify


@pytest.mark.parametrize(
    "query",
    ["ssl_check_hostname=false", "ssl_cert_reqs=required&ssl_check_hostname=false"],
)
def test_url_hostname_check_off_with_verification_on_is_rejected(query: str) -> None:
    """Verifying the certificate without the hostname cannot be expressed and is refused."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(f"rediss://h?{query}")
    assert info.value.option == "ssl_check_hostname"


def test_url_hostname_check_without_verification_is_rejected() -> None:
    """ssl_check_hostname=true together with ssl_cert_reqs=none is contradictory."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string("rediss://h?ssl_cert_reqs=none&ssl_check_hostname=true")
    assert info.value.option == "ssl_check_hostname"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h?ssl_cert_reqs=none",
        "redis://h?ssl_ca_certs=/ca.pem",
        "redis://h?sslHost=x",
        "unix:///tmp/r.sock?ssl_keyfile=/k",
    ],
)
def test_tls_query_options_need_rediss(url: str) -> None:
    """TLS query options on a redis:// or unix:// URL are an error."""
    with pytest.raises(ConfigurationError, match="rediss://"):
        parse_connection_string(url)


def test_url_ssl_host_warns_when_it_differs() -> None:
    """sslHost in a rediss:// URL warns when it differs from the host."""
    with pytest.warns(ConfigurationWarning, match="sslHost"):
        s = parse_connection_string("rediss://10.1.2.3:6380?sslHost=cache.example")
    assert s.ssl_host == "cache.example"


def test_unix_url() -> None:
    """``unix:///path`` sets the socket path, with db and password from the query."""
    s = parse_connection_string("unix:///tmp/r.sock?db=2&password=pw%3D")
    assert s.unix_socket == "/tmp/r.sock"
    assert s.endpoints == ()
    assert s.database == 2
    assert s.password == "pw="


def test_unix_url_with_userinfo_and_encoded_path() -> None:
    """A unix:// URL may carry user and password, and its path is percent-decoded."""
    s = parse_connection_string("unix://bob:pw@/var/run/my%20redis.sock")
    assert (s.username, s.password) == ("bob", "pw")
    assert s.unix_socket == "/var/run/my redis.sock"


@pytest.mark.parametrize("url", ["unix://tmp/r.sock", "unix://", "unix:///"])
def test_unix_url_needs_an_absolute_path(url: str) -> None:
    """A unix:// URL without an absolute socket path (or with a host) is refused."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(url)
    assert info.value.option == "unix_socket"


def test_unknown_scheme_is_named() -> None:
    """An unsupported URL scheme raises an error naming the scheme."""
    with pytest.raises(ConfigurationError, match="'http'") as info:
        parse_connection_string("http://h:6379")
    assert info.value.option == "scheme"


def test_unknown_query_option_is_named() -> None:
    """An unknown URL query option raises an error naming it."""
    with pytest.raises(ConfigurationError, match="decode_responses") as info:
        parse_connection_string("redis://h?decode_responses=1")
    assert info.value.option == "decode_responses"


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://h:0", "port"),
        ("redis://h:70000", "port"),
        ("redis://h:x", "port"),
        ("redis://h:", "port"),
        ("redis://", "host"),
        ("redis:///0", "host"),
        ("redis://:6379", "host"),
        ("redis://u:p@", "host"),
        ("redis://::1", "host"),
        ("redis://[::1", "url"),
        ("redis://[zz]:1", "url"),
        ("redis://[::1]x", "host"),
        ("redis://b@d host", "url"),
        ("redis://h/x", "db"),
        ("redis://h/1/2", "db"),
        ("redis://h/-1", "db"),
        ("redis://h#frag", "url"),
        ("redis://h?db", "db"),
        ("redis://h?db=-1", "db"),
        ("redis://h?db=1&db=2", "db"),
        ("redis://h?name=1&client_name=2", "client_name"),
        ("redis://h?socket_timeout=0", "socket_timeout"),
        ("redis://h?socket_timeout=-1", "socket_timeout"),
        ("redis://h?socket_timeout=inf", "socket_timeout"),
        ("redis://h?socket_connect_timeout=nan", "socket_connect_timeout"),
        ("redis://h?abort_connect=maybe", "abort_connect"),
        ("rediss://h?ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
        ("redis://u:p@h?password=q", "password"),
        ("redis://u@h?username=v", "username"),
        ("redis://%ff@h", "username"),
        ("redis://u:%ff@h", "password"),
        ("redis://h?name=%ff", "name"),
    ],
)
def test_malformed_urls_raise_naming_the_part(url: str, option: str) -> None:
    """Malformed URLs raise ConfigurationError with ``option`` naming the bad part."""
    with pytest.raises(ConfigurationError) as info:
        parse_connection_string(url)
    assert info.value.option == option


# --------------------------------------------------------------------------- redis_kwargs


KWARGS_CASES = [
    "localhost",
    "h:6380,user=app,password=pw,defaultDatabase=3,name=svc,keepAlive=0",
    "h,ssl=true",
    "h,ssl=true,sslVerify=false,sslCaFile=/ca.pem,sslCertFile=/c.pem,sslKeyFile=/k.pem",
    "rediss://u:p@[::1]:7000/1?ssl_cert_reqs=none",
    "unix:///tmp/r.sock?db=4&password=x",
]


@pytest.mark.parametrize("text", KWARGS_CASES)
def test_redis_kwargs_accepted_by_sync_client(text: str) -> None:
    """``redis.Redis(**kw)`` and its connection class accept the kwargs without connecting."""
    kw = parse_connection_string(text).redis_kwargs()
    assert "protocol" not in kw
    client = redis.Redis(**kw)
    try:
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    finally:
        client.close()


@pytest.mark.parametrize("text", KWARGS_CASES)
def test_redis_kwargs_accepted_by_asyncio_client(text: str) -> None:
    """``redis.asyncio.Redis(**kw)`` and its connection class accept the kwargs."""
    kw = parse_connection_string(text).redis_kwargs()

    async def build() -> None:
        client = redis.asyncio.Redis(**kw)
        try:
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        finally:
            await client.aclose()

    asyncio.run(build())


def test_redis_kwargs_contents_tcp() -> None:
    """TCP kwargs carry host, port, db, credentials, timeouts in seconds and keepalive."""
    s = parse_connection_string(
        "h:6390,user=app,password=pw,defaultDatabase=2,name=svc,"
        "connectTimeout=1500,syncTimeout=2500"
    )
    assert s.redis_kwargs() == {
        "host": "h",
        "port": 6390,
        "db": 2,
        "username": "app",
        "password": "pw",
        "socket_connect_timeout": 1.5,
        "socket_timeout": 2.5,
        "socket_keepalive": True,
        "client_name": "svc",
    }


def test_redis_kwargs_keepalive_off() -> None:
    """keepAlive=0 turns socket_keepalive off."""
    assert parse_connection_string("h,keepAlive=0").redis_kwargs()["socket_keepalive"] is False


def test_redis_kwargs_unix() -> None:
    """Unix-socket settings give unix_socket_path and no host, port or TLS keys."""
    kw = parse_connection_string("unix:///tmp/r.sock?db=1").redis_kwargs()
    assert kw["unix_socket_path"] == "/tmp/r.sock"
    assert kw["db"] == 1
    assert not {"host", "port", "ssl", "socket_keepalive"} & kw.keys()


def test_redis_kwargs_for_a_given_endpoint() -> None:
    """An explicit endpoint replaces the first one in the kwargs."""
    s = parse_connection_string("a:1,b:2")
    assert (s.redis_kwargs()["host"], s.redis_kwargs()["port"]) == ("a", 1)
    kw = s.redis_kwargs(s.endpoints[1])
    assert (kw["host"], kw["port"]) == ("b", 2)


def test_redis_kwargs_without_endpoint_raises() -> None:
    """Settings with no endpoint at all cannot produce kwargs."""
    with pytest.raises(ConfigurationError, match="no endpoint"):
        RedisSettings().redis_kwargs()


def test_ssl_verification_on_maps_to_required_and_hostname_check() -> None:
    """With verification on, the TLS connection requires a certificate and checks the name."""
    s = parse_connection_string("h,ssl=true,sslCaFile=/ca.pem")
    kw = s.redis_kwargs()
    assert kw["ssl"] is True
    assert kw["ssl_cert_reqs"] == "required"
    assert kw["ssl_check_hostname"] is True
    assert kw["ssl_ca_certs"] == "/ca.pem"
    client = redis.Redis(**kw)
    try:
        pool = client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        assert conn.cert_reqs == __import__("ssl").CERT_REQUIRED
        assert conn.check_hostname is True
    finally:
        client.close()


def test_ssl_verification_off_maps_to_none_without_hostname_check() -> None:
    """With sslVerify=false, the TLS connection neither verifies nor checks the hostname."""
    s = parse_connection_string("h,ssl=true,sslVerify=false")
    kw = s.redis_kwargs()
    assert kw["ssl_cert_reqs"] == "none"
    assert kw["ssl_check_hostname"] is False
    client = redis.Redis(**kw)
    try:
        pool = client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        assert conn.cert_reqs == __import__("ssl").CERT_NONE
        assert conn.check_hostname is False
    finally:
        client.close()


def test_asyncio_ssl_context_builds_when_verification_off() -> None:
    """The asyncio TLS context can be built with verification off (no check_hostname clash)."""
    kw = parse_connection_string("rediss://h?ssl_cert_reqs=none").redis_kwargs()

    async def build() -> None:
        client = redis.asyncio.Redis(**kw)
        try:
            pool = client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            assert isinstance(conn, redis.asyncio.connection.SSLConnection)
            context = conn.ssl_context.get()
            assert context.check_hostname is False
        finally:
            await client.aclose()

    asyncio.run(build())


def test_no_tls_keys_without_ssl() -> None:
    """Without TLS the kwargs contain no ssl_* keys."""
    kw = parse_connection_string("h").redis_kwargs()
    assert not [k for k in kw if k.startswith("ssl")]


# --------------------------------------------------------------------------- describe, repr


@pytest.mark.parametrize(
    ("text", "described"),
    [
        ("redis://app:pw@127.0.0.1:6379/0", "redis://app@127.0.0.1:6379/0"),
        ("cache1.example:6380,ssl=true,password=pw", "rediss://cache1.example:6380/0"),
        ("unix:///tmp/r.sock?password=pw", "unix:///tmp/r.sock?db=0"),
        ("a,b:7,[::1],defaultDatabase=2", "redis://a:6379,b:7,[::1]:6379/2"),
        (
            "s1,s2:7,serviceName=my master,password=pw",
            "redis+sentinel://s1:26379,s2:7/my%20master/0",
        ),
        ("rediss+sentinel://u:pw@s/m/3", "rediss+sentinel://u@s:26379/m/3"),
    ],
)
def test_describe(text: str, described: str) -> None:
    """describe() gives a one-line URL-like description without the password."""
    assert parse_connection_string(text).describe() == described


def test_password_not_in_repr_or_str() -> None:
    """The password is excluded from repr() and str() of the settings."""
    s = parse_connection_string("h,password=TopSecret123")
    assert "TopSecret123" not in repr(s)
    assert "TopSecret123" not in str(s)
    assert "TopSecret123" not in s.describe()
    assert s.password == "TopSecret123"


def test_settings_are_frozen() -> None:
    """RedisSettings and Endpoint cannot be modified after creation."""
    s = parse_connection_string("h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ssl = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.endpoints[0].port = 1  # type: ignore[misc]


def test_endpoint_str() -> None:
    """str(Endpoint) is host:port, with IPv6 in brackets."""
    assert str(Endpoint("h", 1)) == "h:1"
    assert str(Endpoint("::1", 2)) == "[::1]:2"


def test_parsing_does_no_network_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing never touches the network (no sockets, no name resolution)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used during parsing")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "gethostbyname", forbidden)
    parse_connection_string("cache.example:6380,ssl=true,password=x")
    parse_connection_string("rediss://cache.example/1")


def test_docstring_table_lists_every_option() -> None:
    """The module docstring (the user reference) mentions every accepted option name."""
    doc = config_module.__doc__ or ""
    names = [o.name for o in config_module._SE_OPTIONS.values()]
    names += [o.name for o in config_module._URL_OPTIONS.values()]
    names += list(config_module._SE_IGNORED.values())
    missing = [name for name in names if f"``{name}``" not in doc]
    assert not missing


# --------------------------------------------------------------------------- password hygiene


_pw_chars = st.characters(exclude_characters=",", exclude_categories=["Cs"])
passwords = st.builds(
    lambda a, b: a + MARK + b, st.text(_pw_chars, max_size=12), st.text(_pw_chars, max_size=12)
)

BROKEN_SE = [
    "h:0,password={pw}",
    "password={pw},h:notaport",
    "h,password={pw},bogus=1",
    "h,password={pw},ssl=maybe",
    "password={pw}",
    "h,password={pw},password={pw}",
    "h,password={pw},keepAlive=-5",
    "h,password={pw},[::1",
    "password={pw},bad host",
    "h,password={pw},name=has space",
    "/sock,password={pw},ssl=true",
    "h,sentinelPassword={pw},serviceName=m,bogus=1",
    "h,sentinelPassword={pw}",
    "sentinelPassword={pw},serviceName=m",
    "/sock,sentinelPassword={pw},serviceName=m",
]

BROKEN_URL = [
    "redis://user:{q}@h:99999/0",
    "redis://user:{q}@h/notadb",
    "redis://user:{q}@h/0?bogus=1",
    "redis://:{q}@/0",
    "rediss://user:{q}@h?ssl_cert_reqs=maybe",
    "redis://u:{q}@h?password={q}",
    "unix://:{q}@host/tmp/s",
    "redis://h/0?password={q}&db=x",
    "redis://u:{q}@h?ssl_ca_certs=/x",
    "redis://u:{q}@::1/0",
    "ftp://u:{q}@h",
    "redis+sentinel://u:{q}@h/m/x?sentinelPassword={q}",
    "redis+sentinel://u:{q}@h?sentinelPassword={q}",
    "redis://h?sentinelPassword={q}",
    "rediss+sentinel://h/m?sentinel_password={q}&db=x",
]


def assert_no_mark(exc: ConfigurationError) -> None:
    """The marker is in neither the message, the repr, the args nor the option."""
    assert MARK not in str(exc)
    assert MARK not in repr(exc)
    assert all(MARK not in str(arg) for arg in exc.args)
    assert MARK not in (exc.option or "")
    assert exc.__cause__ is None
    assert exc.__suppress_context__


@given(pw=passwords, template=st.sampled_from(BROKEN_SE))
def test_password_never_in_stackexchange_errors(pw: str, template: str) -> None:
    """For any password, errors from malformed StackExchange strings never contain it."""
    with pytest.raises(ConfigurationError) as info:
        parse_quietly(template.format(pw=pw))
    assert_no_mark(info.value)


@given(pw=passwords, template=st.sampled_from(BROKEN_URL))
def test_password_never_in_url_errors(pw: str, template: str) -> None:
    """For any (percent-encoded) password, errors from malformed URLs never contain it."""
    with pytest.raises(ConfigurationError) as info:
        parse_quietly(template.format(q=quote(pw, safe="")))
    assert_no_mark(info.value)


@given(pw=passwords)
def test_password_kept_but_never_shown(pw: str) -> None:
    """For any password, parsing keeps it exactly yet repr, str and describe never show it."""
    for text, expected in [
        (f"h,password={pw}", pw.strip()),
        (f"redis://u:{quote(pw, safe='')}@h/0", pw),
        (f"unix:///s?password={quote(pw, safe='')}", pw),
    ]:
        s = parse_quietly(text)
        assert s.password == expected
        for shown in (repr(s), str(s), s.describe()):
            assert MARK not in shown
    for text in (
        f"s,serviceName=m,sentinelPassword={pw}",
        f"redis+sentinel://s/m?sentinelPassword={quote(pw, safe='')}",
    ):
        s = parse_quietly(text)
        assert MARK in (s.sentinel_password or "")
        assert MARK in s.sentinel_kwargs(s.endpoints[0])["password"]
        for shown in (repr(s), str(s), s.describe()):
            assert MARK not in shown


def test_scrub_replaces_password_text() -> None:
    """A password split by an unescaped comma is still masked if it reappears whole."""
    exc = config_module._scrub(
        ConfigurationError("bad 'hunter22' here", option="hunter22"), ["hunter22"]
    )
    assert "hunter22" not in str(exc)
    assert exc.option == "***"


# --------------------------------------------------------------------------- fuzzing


def outcome_is_settings_or_configuration_error(text: str) -> None:
    """Parse ``text``; only RedisSettings or ConfigurationError may come out."""
    try:
        result = parse_quietly(text)
    except ConfigurationError:
        return
    assert isinstance(result, RedisSettings)
    assert result.endpoints or result.unix_socket
    result.describe()
    result.redis_kwargs()
    if result.sentinel:
        result.sentinel_kwargs(result.endpoints[0])


@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    """Arbitrary text either parses or raises ConfigurationError, nothing else."""
    outcome_is_settings_or_configuration_error(text)


_fragments = st.sampled_from(
    [
        "h",
        "h:1",
        "[::1]:6379",
        "::1",
        "/s",
        "ssl=true",
        "ssl=x",
        "password=a=b",
        "user=u",
        "keepAlive=-1",
        "connectTimeout=10",
        "syncTimeout=",
        "defaultDatabase=99",
        "sslHost=h",
        "serviceName=m",
        "sentinelPassword=p",
        "sentinelUser=u",
        "allowAdmin=true",
        "$PING=",
        "=",
        ":",
        "[",
        "]",
        "%",
    ]
)


@given(st.lists(st.one_of(_fragments, st.text(max_size=8)), max_size=8))
def test_fuzz_stackexchange_like_text(parts: list[str]) -> None:
    """Comma-joined plausible and random fragments parse or raise ConfigurationError only."""
    outcome_is_settings_or_configuration_error(",".join(parts))


_url_alphabet = st.sampled_from([*"abh019:@/?&=#[]%.-_+ ,", "%ff", "%40", "::1"])


@given(
    scheme=st.sampled_from(
        ["redis://", "rediss://", "unix://", "REDIS://", "x://", "redis+sentinel://"]
    ),
    rest=st.lists(_url_alphabet, max_size=20).map("".join),
)
def test_fuzz_url_like_text(scheme: str, rest: str) -> None:
    """URL-like text parses or raises ConfigurationError only."""
    outcome_is_settings_or_configuration_error(scheme + rest)


_hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
_plain = st.text(
    st.characters(exclude_characters=",", exclude_categories=["Cs", "Zs", "Cc", "Zl", "Zp"]),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200)
@given(
    hosts=st.lists(st.tuples(_hosts, st.integers(1, 65535)), min_size=1, max_size=3, unique=True),
    ssl=st.booleans(),
    password=st.none() | _plain,
    user=st.none() | _plain,
    connect_ms=st.integers(1, 10**6),
    sync_ms=st.integers(1, 10**6),
    database=st.integers(0, 10**6),
    keepalive=st.integers(1, 10**5),
    retry=st.integers(0, 100),
    prefix=st.none() | _plain,
    data=st.data(),
)
def test_stackexchange_roundtrip(
    hosts: list[tuple[str, int]],
    ssl: bool,
    password: str | None,
    user: str | None,
    connect_ms: int,
    sync_ms: int,
    database: int,
    keepalive: int,
    retry: int,
    prefix: str | None,
    data: st.DataObject,
) -> None:
    """Generated valid StackExchange strings, in any token order and name case, parse exactly."""
    tokens = [f"{h}:{p}" for h, p in hosts]
    tokens += [
        f"ssl={ssl}",
        f"connectTimeout={connect_ms}",
        f"syncTimeout={sync_ms}",
        f"defaultDatabase={database}",
        f"keepAlive={keepalive}",
        f"connectRetry={retry}",
    ]
    if password is not None:
        tokens.append(f"password={password}")
    if user is not None:
        tokens.append(f"user={user}")
    if prefix is not None:
        tokens.append(f"channelPrefix={prefix}")
    tokens = data.draw(st.permutations(tokens))
    tokens = [
        data.draw(st.sampled_from([t, t.upper(), t.lower()])) if "=" not in t else t for t in tokens
    ]
    lowered_key = data.draw(st.booleans())
    if lowered_key:
        tokens = [
            t.split("=", 1)[0].lower() + "=" + t.split("=", 1)[1] if "=" in t else t for t in tokens
        ]
    s = parse_connection_string(",".join(tokens))
    expected_hosts = [t.lower() for t in tokens if "=" not in t]
    assert [str(e).lower() for e in s.endpoints] == expected_hosts
    assert s == RedisSettings(
        endpoints=s.endpoints,
        username=user,
        password=password,
        ssl=ssl,
        connect_timeout=connect_ms / 1000,
        sync_timeout=sync_ms / 1000,
        database=database,
        keepalive=float(keepalive),
        connect_retry=retry,
        channel_prefix=prefix or "",
    )
    assert s.password == password
