"""The web dashboard on a real qless: its JSON API, every action, tokens, sessions, CSRF,
cross-site refusals, read-only, secrets hidden, Redis away, and ``qless-pool web`` served."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from markupsafe import escape
from pools import free_port
from processes import wait_for
from webtools import (
    READ_TOKEN,
    SCRIPT,
    WRITE_TOKEN,
    bearer,
    make_failed,
    serve,
    token_file,
)
from workers import put

from qless_pool.ops import pools
from qless_pool.web import create_app
from qless_pool.web.tokens import hash_token

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app(redis_url):
    return create_app(redis_url)


@pytest.fixture
def web(app):
    """A browser-like client of the dashboard without a token file, its CSRF token at hand."""
    browser = app.test_client()
    browser.get("/")
    return browser


def csrf_of(browser) -> str:
    with browser.session_transaction() as session:
        return session["csrf"]


def post(browser, path, data=None, **kwargs):
    """A form post from the dashboard's own page (its CSRF token, same origin)."""
    form = {"csrf": csrf_of(browser), **(data or {})}
    return browser.post(path, data=form, headers={"Sec-Fetch-Site": "same-origin"}, **kwargs)


# --- looking --------------------------------------------------------------------------------------


def test_api_queues_jobs_failed_and_workers(web, client):
    waiting = put(client, "mail", "Noop", {"to": "a"})
    put(client, "mail", "Noop", delay=600)
    failed = make_failed(client, "mail", "mail-ValueError", 3)
    client.queues["mail"].pause()
    [queue] = web.get("/api/queues").get_json()
    assert queue == {
        "name": "mail", "waiting": 1, "running": 0, "scheduled": 1, "stalled": 0, "depends": 0,
        "recurring": 0, "paused": True,
    }  # fmt: skip
    job = web.get(f"/api/jobs/{waiting}").get_json()
    assert (job["jid"], job["klass"], job["data"], job["state"]) == (
        waiting, "testjobs.Noop", {"to": "a"}, "waiting",
    )  # fmt: skip
    assert web.get("/api/jobs/nope").status_code == 404
    assert web.get("/api/failed").get_json() == {"mail-ValueError": 3}
    page = web.get("/api/failed/mail-ValueError?offset=1&limit=1").get_json()
    assert page["total"] == 3 and len(page["jobs"]) == 1
    assert page["jobs"][0]["jid"] in failed and page["jobs"][0]["failure"]["message"] == "boom"
    assert web.get("/api/failed/nope").status_code == 404
    assert web.get("/api/failed/mail-ValueError?limit=0").status_code == 400
    [worker] = web.get("/api/workers").get_json()
    assert worker == {"name": "test-worker", "jobs": [], "stalled": []}


def test_every_page_answers(web, client):
    jid = put(client, "mail", "Noop", tags=["t1"])
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    pages = [
        "/", "/queues/mail", "/queues/mail?state=scheduled", f"/jobs/{jid}", f"/jobs/{failed}",
        "/failed", "/failed/mail-Err", "/failed/mail-Err/retry", "/failed/mail-Err/cancel",
        "/workers", "/pools",
    ]  # fmt: skip
    for path in pages:
        answer = web.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["Content-Type"].startswith("text/html")
    assert web.get(f"/jobs?jid={jid}").headers["Location"].endswith(f"/jobs/{jid}")
    assert web.get("/jobs?jid=missing").status_code == 404
    assert web.get("/queues/nope").status_code == 404
    assert web.get("/queues/mail?state=done").status_code == 400
    confirm = web.get("/failed/mail-Err/retry").get_data(as_text=True)
    assert "Retry all 1 failed job(s) of mail-Err?" in confirm


def test_a_queue_page_pages_its_jobs_and_draws_todays_statistics(web, client):
    jids = [put(client, "q", "Noop", priority=0) for _ in range(30)]
    client.queues["q"].pop(2)  # wait time for the histogram
    body = web.get("/queues/q").get_data(as_text=True)
    assert "1\u201325 of 28" in body and "older »" in body
    assert body.count('href="/jobs/') == 25
    second = web.get("/queues/q?offset=25").get_data(as_text=True)
    assert "26\u201328 of 28" in second and jids[-1] in second
    assert "Wait: 2 job(s)" in body and "<rect" in body  # qless's stats, as SVG bars


# --- acting ---------------------------------------------------------------------------------------


def test_every_action_through_the_api(web, client):
    token = {"X-CSRF-Token": csrf_of(web)}
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    answer = web.post(f"/api/jobs/{failed}/retry", headers=token)
    assert (answer.status_code, answer.get_json()) == (200, {"count": 1})
    assert client.jobs[failed].state == "waiting"
    again = web.post(f"/api/jobs/{failed}/retry", headers=token)
    assert again.status_code == 409 and "not failed (waiting)" in again.get_json()["error"]
    assert web.post("/api/jobs/nope/retry", headers=token).status_code == 404

    moved = web.post(f"/api/jobs/{failed}/move", json={"queue": "other"}, headers=token)
    assert moved.get_json() == {"jid": failed, "queue": "other"}
    assert client.jobs[failed].queue_name == "other"
    assert web.post(f"/api/jobs/{failed}/move", json={}, headers=token).status_code == 400
    web.post(f"/api/jobs/{failed}/priority", json={"priority": 7}, headers=token)
    assert client.jobs[failed].priority == 7
    bad = web.post(f"/api/jobs/{failed}/priority", json={"priority": "high"}, headers=token)
    assert bad.status_code == 400
    tagged = web.post(f"/api/jobs/{failed}/tag", json={"tags": ["a", "b"]}, headers=token)
    assert tagged.get_json()["tags"] == ["a", "b"]
    web.post(f"/api/jobs/{failed}/untag", json={"tags": ["a"]}, headers=token)
    assert client.jobs[failed].tags == ["b"]
    web.post(f"/api/jobs/{failed}/track", headers=token)
    assert client.jobs[failed].tracked is True
    web.post(f"/api/jobs/{failed}/untrack", headers=token)
    assert client.jobs[failed].tracked is False

    web.post("/api/queues/other/pause", headers=token)
    assert web.get("/api/queues").get_json()[-1]["paused"] is True
    web.post("/api/queues/other/unpause", headers=token)
    assert not any(q["paused"] for q in web.get("/api/queues").get_json())
    assert web.post("/api/queues/nope/pause", headers=token).status_code == 404

    assert web.post(f"/api/jobs/{failed}/cancel", headers=token).get_json() == {"count": 1}
    assert client.jobs[failed] is None


def test_retry_all_and_cancel_all_act_on_every_job_in_batches(web, client):
    make_failed(client, "bulk", "bulk-Err", 1_200)  # more than two batches of 500
    make_failed(client, "bulk", "bulk-Other", 600)
    token = {"X-CSRF-Token": csrf_of(web)}
    answer = web.post("/api/failed/bulk-Err/retry", headers=token)
    assert answer.get_json() == {"count": 1_200, "refused": 0}
    assert client.queues["bulk"].counts["waiting"] == 1_200
    assert web.get("/api/failed").get_json() == {"bulk-Other": 600}
    # The page's way: the confirmation shows the count, the form does it.
    confirm = web.get("/failed/bulk-Other/cancel").get_data(as_text=True)
    assert "Cancel all 600 failed job(s) of bulk-Other?" in confirm
    done = post(web, "/failed/bulk-Other/cancel", follow_redirects=True)
    assert "canceled 600 job(s) of bulk-Other" in done.get_data(as_text=True)
    assert web.get("/api/failed").get_json() == {}
    assert web.post("/api/failed/bulk-Other/retry", headers=token).status_code == 404


def test_page_forms_act_and_say_what_they_did(web, client):
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    page = web.get(f"/jobs/{failed}").get_data(as_text=True)
    assert 'id="retry"' in page and 'name="csrf"' in page
    done = post(web, f"/jobs/{failed}/retry", follow_redirects=True)
    assert f"{failed}: retried: it waits in its queue" in done.get_data(as_text=True)
    assert client.jobs[failed].state == "waiting"
    post(web, f"/jobs/{failed}/priority", {"priority": "3"})
    post(web, f"/jobs/{failed}/tag", {"tags": "x, y"})
    assert (client.jobs[failed].priority, client.jobs[failed].tags) == (3, ["x", "y"])
    post(web, "/queues/mail/pause")
    assert client.queues["mail"].counts["paused"] is True
    refused = post(web, f"/jobs/{failed}/retry")
    assert refused.status_code == 400 and "not failed (waiting)" in refused.get_data(as_text=True)


# --- who may act ----------------------------------------------------------------------------------


def test_forms_need_the_csrf_token_and_the_same_site(web, client):
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    path = f"/jobs/{failed}/retry"
    assert web.post(path).status_code == 403  # no CSRF token
    assert web.post(path, data={"csrf": "forged"}).status_code == 403
    cross = web.post(path, data={"csrf": csrf_of(web)}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403 and "cross-site" in cross.get_data(as_text=True)
    other = web.post(path, data={"csrf": csrf_of(web)}, headers={"Origin": "https://evil.example"})
    assert other.status_code == 403 and "another site" in other.get_data(as_text=True)
    api = web.post(f"/api/jobs/{failed}/retry", headers={"Sec-Fetch-Site": "same-site"})
    assert api.status_code == 403
    assert client.jobs[failed].state == "failed"  # none of them acted
    assert post(web, path).status_code == 302
    assert client.jobs[failed].state == "waiting"


def test_tokens_scopes_and_revocation(redis_url, client, tmp_path):
    tokens = token_file(tmp_path)
    app = create_app(redis_url, token_file=str(tokens))
    api = app.test_client()
    [failed] = make_failed(client, "mail", "mail-Err", 2)[:1]
    assert api.get("/api/queues").status_code == 401
    assert api.get("/api/queues").headers["WWW-Authenticate"].startswith("Bearer")
    assert api.get("/api/queues", headers=bearer("wrong-token-0123456789")).status_code == 401
    assert api.get("/api/queues", headers=bearer(READ_TOKEN)).status_code == 200
    refused = api.post(f"/api/jobs/{failed}/retry", headers=bearer(READ_TOKEN))
    assert refused.status_code == 403 and "read token" in refused.get_json()["error"]
    assert client.jobs[failed].state == "failed"
    acted = api.post(f"/api/jobs/{failed}/retry", headers=bearer(WRITE_TOKEN))
    assert acted.get_json() == {"count": 1}
    # A page without a login goes to the login form; the static files are open to it.
    assert "/login?next=" in api.get("/failed").headers["Location"]
    assert api.get("/static/app.css").status_code == 200
    # Taking the line out of the file revokes the token at once (it was remembered).
    tokens.write_text(tokens.read_text().splitlines()[1] + "\n")
    os.utime(tokens, ns=(time.time_ns() + 10**9,) * 2)
    assert api.get("/api/queues", headers=bearer(WRITE_TOKEN)).status_code == 401
    assert api.get("/api/queues", headers=bearer(READ_TOKEN)).status_code == 200


def test_a_browser_logs_in_with_a_token_and_its_cookie_follows_the_file(
    redis_url, client, tmp_path
):
    tokens = token_file(tmp_path)
    browser = create_app(redis_url, token_file=str(tokens)).test_client()
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    form = browser.get("/login?next=/failed").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    wrong = browser.post("/login", data={"csrf": csrf, "token": "not-a-token-at-all-0000"})
    assert wrong.status_code == 401 and "not accepted" in wrong.get_data(as_text=True)
    assert browser.post("/login", data={"token": WRITE_TOKEN}).status_code == 403  # no CSRF
    logged = browser.post("/login", data={"csrf": csrf, "token": WRITE_TOKEN, "next": "/failed"})
    assert (logged.status_code, logged.headers["Location"]) == (302, "/failed")
    cookie = logged.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and WRITE_TOKEN not in cookie
    assert "alice (write)" in browser.get("/failed").get_data(as_text=True)
    assert post(browser, f"/jobs/{failed}/retry").status_code == 302
    assert client.jobs[failed].state == "waiting"
    # Off-site "next" targets are not followed.
    again = browser.post("/login", data={"csrf": csrf_of(browser), "token": WRITE_TOKEN,
                                         "next": "//evil.example/"})  # fmt: skip
    assert again.headers["Location"] == "/"
    # The token leaves the file: the session lets nothing in any more.
    tokens.write_text("# nobody\n")
    os.utime(tokens, ns=(time.time_ns() + 10**9,) * 2)
    assert browser.get("/failed").status_code == 302
    post(browser, "/logout")


def test_read_only_refuses_every_action_and_shows_no_form(redis_url, client):
    browser = create_app(redis_url, read_only=True).test_client()
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    page = browser.get(f"/jobs/{failed}").get_data(as_text=True)
    assert "read-only" in page and 'id="retry"' not in page
    for path in (f"/api/jobs/{failed}/retry", "/api/failed/mail-Err/retry",
                 "/api/queues/mail/pause"):  # fmt: skip
        answer = browser.post(path, headers={"X-CSRF-Token": csrf_of(browser)})
        assert answer.status_code == 403 and "read-only" in answer.get_json()["error"]
    assert post(browser, f"/jobs/{failed}/cancel").status_code == 403
    assert client.jobs[failed].state == "failed"


def test_hash_token_prints_the_line_and_refuses_a_short_token(tmp_path):
    done = subprocess.run(
        [SCRIPT, "web", "hash-token", "--scope", "write"], input=WRITE_TOKEN + "\n",
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scope, stored = done.stdout.split()
    assert scope == "write" and stored.startswith("scrypt$16384$8$1$") and WRITE_TOKEN not in stored
    tokens = tmp_path / "tokens"
    tokens.write_text(done.stdout)
    app = create_app("redis://localhost:1/0", token_file=str(tokens))
    assert app.extensions["qless_pool"].tokens.check(WRITE_TOKEN).scope == "write"
    assert hash_token(WRITE_TOKEN, "write") != hash_token(WRITE_TOKEN, "write")  # salted
    short = subprocess.run(
        [SCRIPT, "web", "hash-token", "--scope", "read"], input="short\n",
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert short.returncode == 2 and "at least 16 characters" in short.stderr


# --- what is never shown --------------------------------------------------------------------------

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_hostile_names_data_tags_and_messages_are_shown_escaped(web, client):
    queue = f"q{XSS}"
    jid = client.queues[queue].put("testjobs.Noop", {"note": XSS}, tags=[XSS])
    [failed] = make_failed(client, "mail", f"grp{XSS}", 1, message=f"error {XSS}")
    pages = ["/", f"/queues/{queue}", f"/jobs/{jid}", f"/jobs/{failed}", "/failed",
             f"/failed/grp{XSS}", f"/failed/grp{XSS}/retry"]  # fmt: skip
    for path in pages:
        answer = web.get(path)
        body = answer.get_data(as_text=True)
        assert answer.status_code == 200, path
        assert "<script>alert" not in body and "<img src=x" not in body, path
    assert str(escape(XSS)) in web.get(f"/jobs/{jid}").get_data(as_text=True)
    # The API gives the text as it is, as JSON (its content type keeps a browser from running it).
    answer = web.get(f"/api/jobs/{jid}")
    assert answer.get_json()["tags"] == [XSS] and answer.content_type == "application/json"
    assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Frame-Options"] == "DENY"


def test_no_password_and_no_secret_data_on_any_page(redis_with_password, tmp_path):
    url = redis_with_password.url()
    from qless_pool.client import connect

    client = connect(url, worker_name="test-producer")
    secret_data = {"user": "ann", "password": "hunter2", "nested": {"API-Token": "tok-123"},
                   "items": [{"client_secret": "cs-9"}]}  # fmt: skip
    jid = client.queues["mail"].put("testjobs.Noop", secret_data)
    [failed] = make_failed(client, "mail", "mail-Err", 1, data=secret_data,
                           message=f"cannot reach {url}")  # fmt: skip
    browser = create_app(url).test_client()
    for path in [
        "/",
        f"/jobs/{jid}",
        f"/jobs/{failed}",
        "/failed/mail-Err",
        "/workers",
        "/pools",
        f"/api/jobs/{jid}",
        f"/api/jobs/{failed}",
        "/api/failed/mail-Err",
    ]:
        body = browser.get(path).get_data(as_text=True)
        for secret in ("secretpw", "hunter2", "tok-123", "cs-9"):
            assert secret not in body, (path, secret)
    shown = browser.get(f"/api/jobs/{jid}").get_json()["data"]
    assert shown == {"user": "ann", "password": "[hidden]", "nested": {"API-Token": "[hidden]"},
                     "items": [{"client_secret": "[hidden]"}]}  # fmt: skip
    chosen = create_app(url, hide_data_keys=["user"]).test_client()
    assert chosen.get(f"/api/jobs/{jid}").get_json()["data"]["user"] == "[hidden]"
    client.redis.close()


# --- Redis away -----------------------------------------------------------------------------------


def test_redis_away_answers_503_and_the_dashboard_recovers(tmp_path):
    from redis_server import RedisServer

    server = RedisServer().start()
    try:
        browser = create_app(server.url()).test_client()
        assert browser.get("/").status_code == 200
        server.stop()
        page = browser.get("/")
        assert page.status_code == 503 and page.headers["Retry-After"] == "5"
        text = page.get_data(as_text=True)
        assert "is not answering" in text and 'http-equiv="refresh"' in text
        api = browser.get("/api/queues")
        assert api.status_code == 503 and "is not answering" in api.get_json()["error"]
        server.start()
        wait_for(lambda: browser.get("/").status_code == 200, timeout=10)
        assert browser.get("/api/queues").get_json() == []
    finally:
        server.remove()


# --- the pools page -------------------------------------------------------------------------------


def test_pools_shows_every_pool_its_entries_workers_and_running_jobs(web, client, start_pool):
    pool = start_pool(config="foo: 2\nbar,baz: 1\n", expect={"foo": 2, "bar,baz": 1})
    wait_for(lambda: sum(p["workers"] for p in web.get("/api/pools").get_json()) == 3,
             message="every worker's card")  # fmt: skip
    [shown] = web.get("/api/pools").get_json()
    assert shown["pid"] == pool.pid and shown["host"] == os.uname().nodename
    assert shown["app"] == "testapp"
    entries = {",".join(e["queues"]): e for e in shown["entries"]}
    assert {name: e["count"] for name, e in entries.items()} == {"foo": 2, "bar,baz": 1}
    assert sorted(w["pid"] for e in shown["entries"] for w in e["workers"]) == sorted(
        pool.workers()
    )
    jid = put(client, "bar", "Sleep", {"seconds": 30})

    def running() -> list:
        [bar] = [e for e in web.get("/api/pools").get_json()[0]["entries"] if "bar" in e["queues"]]
        return bar["workers"][0]["jobs"]

    wait_for(lambda: running() == [{"jid": jid, "klass": "testjobs.Sleep", "queue": "bar"}])
    assert "testjobs.Sleep" in web.get("/pools").get_data(as_text=True)
    client.jobs[jid].cancel()
    pool.send(__import__("signal").SIGQUIT)
    pool.process.wait(timeout=20)
    assert web.get("/api/pools").get_json() == []  # a clean stop takes the cards away


def test_a_card_that_lapsed_leaves_the_page(web, client):
    card = pools.Card("gone-1", "gone", 1, 99, None, ("foo",), "in process", time.time() - 90)
    pools.write_card(client.redis, card, now=time.time() - pools.TTL - 1)
    fresh = pools.Card("here-2", "here", 2, None, "app", ("foo",), "fork per job", time.time())
    pools.write_card(client.redis, fresh)
    shown = web.get("/api/pools").get_json()
    assert [(p["host"], p["pid"], p["workers"]) for p in shown] == [("here", None, 1)]
    assert client.redis.hkeys(pools.CARDS) == ["here-2"]  # the lapsed card removed


# --- served ---------------------------------------------------------------------------------------


def test_served_under_a_prefix_with_its_headers(redis_url, client, tmp_path):
    put(client, "mail", "Noop")
    served = serve(redis_url, free_port(), tmp_path / "web.log", prefix="/qless")
    try:
        status, headers, body = served.get("/")
        assert status == 200 and 'href="/qless/queues/mail"' in body
        assert 'src="/qless/static/app.js"' in body
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "Path=/qless/" in headers["Set-Cookie"]
        status, _, text = served.get("/api/queues")
        assert status == 200 and json.loads(text)[0]["waiting"] == 1
    finally:
        served.stop()
    assert "serving the dashboard on http://127.0.0.1:" in served.log.read_text()


def test_served_refuses_what_would_expose_it(redis_url, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SCRIPT, "web", "-R", redis_url, *args], capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    exposed = run("--host", "0.0.0.0")
    assert exposed.returncode == 2 and "not a loopback address" in exposed.stderr
    bad = tmp_path / "tokens"
    bad.write_text("write not-a-hash\n")
    refused = run("--token-file", str(bad))
    assert refused.returncode == 2 and f"token file {bad}, line 1" in refused.stderr
    assert run("--prefix", "qless").returncode == 2
    assert run("-R", "http://nope").returncode == 2
