"""The Redis URLs the pool takes: redis://, rediss://, unix:// and redis+sentinel://, checked
before anything starts, and never shown with a password."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qless_pool.client import connect
from qless_pool.urls import (
    DEFAULT_SENTINEL_PORT,
    SentinelTarget,
    check_redis_url,
    mask_argument,
    mask_secrets,
    parse_sentinel_url,
)
from qless_pool.urls import _checked_url as checked_url

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://:pw@localhost:6379/0?socket_keepalive=true&max_connections=5",
        "rediss://localhost:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        "rediss://user:pw@redis.example:6380/1?ssl_cert_reqs=none&ssl_check_hostname=false",
        "unix:///run/redis.sock?db=2",
        "redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster",
        "redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3",
        "redis+sentinel://user:pw@s1/mymaster/0?sentinel_password=spw&socket_keepalive=true",
        "redis+sentinel://[::1]:26379,10.0.0.2/mymaster/",
    ],
)
def test_urls_that_work(url):
    assert check_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1:26379", "names no service"),
        ("redis+sentinel://s1:26379/", "names no service"),
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://s1:26379,,s2/mymaster", "an empty sentinel address"),
        ("redis+sentinel://s1:port/mymaster", "the sentinel 's1:port' is not host:port"),
        ("redis+sentinel://s1:0/mymaster", "the sentinel 's1:0' is not host:port"),
        ("redis+sentinel://s1:26379,s2:99999/mymaster", "the sentinel 's2:99999' is not"),
        ("redis+sentinel://s1/mymaster/x", "the database 'x' is not a number"),
        ("redis+sentinel://s1/mymaster?db=x", "the database 'x' is not a number"),
        ("redis+sentinel://s1/mymaster/0/1", "the path is /service or /service/db"),
        ("redis+sentinel://s1/mymaster?ssl_ca_certs=/ca.pem", "not supported"),
        ("redis+sentinel://s1/mymaster?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://localhost/0?colour=blue", "redis-py takes no option 'colour'"),
        ("redis://localhost/0?ssl_ca_certs=/ca.pem", "TLS options need rediss://"),
        ("rediss://localhost/0?ssl_cert_reqs=maybe", "maybe"),
        ("unix:///run/redis.sock?socket_keepalive=true", "no option 'socket_keepalive'"),
    ],
)
def test_urls_that_cannot_work(url, problem):
    with pytest.raises(ValueError) as refused:
        check_redis_url(url)
    assert problem in str(refused.value)


def test_a_url_that_passed_is_remembered_and_one_refused_is_checked_every_time():
    # The manager's check before it forks serves every worker's connect(): the check reads
    # redis-py's signatures, which in a worker would copy megabytes of shared pages.
    url = "redis://localhost:6390/4?socket_keepalive=true"
    check_redis_url(url)
    hits = checked_url.cache_info().hits
    assert check_redis_url(url) == url
    assert checked_url.cache_info().hits == hits + 1
    for _ in range(2):
        with pytest.raises(ValueError, match="no option 'colour'"):
            check_redis_url("redis://localhost/0?colour=blue")


def test_a_sentinel_url_read():
    target = parse_sentinel_url(
        "redis+sentinel://app:p%40ss@s1:26379,[::1]:26380,s3/my%20master/4"
        "?sentinel_password=spw&socket_keepalive=true&check_connection=no"
    )
    assert target == SentinelTarget(
        sentinels=(("s1", 26379), ("::1", 26380), ("s3", DEFAULT_SENTINEL_PORT)),
        service="my master",
        db=4,
        username="app",
        password="p@ss",
        sentinel_password="spw",
        query=(("socket_keepalive", "true"), ("check_connection", "no")),
    )
    # Typed as redis-py types a redis:// URL's options.
    assert target.master_options() == {
        "socket_keepalive": True,
        "check_connection": False,
        "db": 4,
        "username": "app",
        "password": "p@ss",
    }
    assert target.sentinel_options() == {"password": "spw"}
    assert parse_sentinel_url("redis+sentinel://s1/m").sentinel_options() == {}
    assert parse_sentinel_url("redis+sentinel://s1/m?db=2").db == 2


def test_connect_hands_a_sentinel_url_to_redis_pys_sentinel():
    # Nothing is connected until the first command: no Sentinel needs to be there.
    client = connect(
        "redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2?sentinel_password=spw",
        "worker-1",
        socket_timeout=3,
        socket_connect_timeout=1,
        announce=False,
    )
    assert client.worker_name == "worker-1"
    pool = client.redis.connection_pool
    assert pool.service_name == "mymaster" and pool.is_master
    options = pool.connection_kwargs
    assert (options["db"], options["password"], options["socket_timeout"]) == (2, "pw", 3)
    assert options["decode_responses"] is True and options["protocol"] == 2
    sentinels = pool.sentinel_manager.sentinels
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ] == [("s1", 26379), ("s2", 26380)]
    for sentinel in sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert kwargs["password"] == "spw"
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3, 1)
        assert kwargs["retry"].get_retries() == 0  # a Sentinel that is down: the next one
    # The fixed qless-core script is registered on the Sentinel-managed Redis.
    assert client._lua.registered_client is client.redis


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0",
        ),
        (
            "redis+sentinel://s1/mymaster?sentinel_password=spw&db=1",
            "redis+sentinel://s1/mymaster?sentinel_password=***&db=1",
        ),
        (
            "rediss://u:pw@h:6380/0?ssl_password=kp&ssl_ca_certs=/ca.pem",
            "rediss://u:***@h:6380/0?ssl_password=***&ssl_ca_certs=/ca.pem",
        ),
    ],
)
def test_passwords_are_masked(url, shown):
    assert mask_secrets(f"connecting to {url} now") == f"connecting to {shown} now"


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:pa/ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:pa?ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:pa'ss@h:6379/0", "redis://:***@h:6379/0"),
        ('redis://:pa"ss@h/0', "redis://:***@h/0"),
        ("redis://:p@s:s@h/0", "redis://:***@h/0"),
        ("redis://h/0?password=pa'ss&db=1", "redis://h/0?password=***&db=1"),
    ],
)
def test_passwords_with_characters_a_url_should_escape_are_masked(url, shown):
    assert mask_secrets(f"cannot use {url}: no") == f"cannot use {shown}: no"
    assert mask_secrets(f"cannot use '{url}'") == f"cannot use '{shown}'"


def test_a_command_line_url_is_masked_to_its_end():
    assert mask_argument("redis://:pa ss@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_argument("--redis=redis://:a b'c@h/0") == "--redis=redis://:***@h/0"
    assert mask_argument("-Rredis://:pw@h/0") == "-Rredis://:***@h/0"
    assert mask_argument("--interval=2") == "--interval=2"


# --- at the command line --------------------------------------------------------------------------


def qless_pool(project, *args):
    environ = {k: v for k, v in os.environ.items() if k not in ("QLESS_URL", "REDIS_URL")}
    return subprocess.run(
        [SCRIPT, *args], cwd=project, env=environ, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:s3cret@s1:26379,s2:26379", "names no service"),
        ("redis+sentinel://:s3cret@s1:26379,s2:x/mymaster", "the sentinel 's2:x' is not"),
        ("rediss://:s3cret@h/0?ssl_cert_reqs=maybe", "maybe"),
        ("redis://:s3cret@h/0?colour=blue", "no option 'colour'"),
    ],
)
def test_a_url_that_cannot_work_is_one_line_and_exit_2(project, url, problem):
    result = qless_pool(project, "-R", url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("qless-pool: bad Redis URL (from --redis): ")
    assert problem in line
    assert "s3cret" not in line and ":***@" in line
    assert not (project / "tmp").exists()  # nothing started


def test_a_sentinel_url_passes_the_start_checks(project):
    result = qless_pool(project, "-R", "redis+sentinel://:pw@s1,s2/mymaster/0", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '{"foo": 1}'
