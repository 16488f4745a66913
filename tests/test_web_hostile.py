"""The web dashboard against hostile requests: open redirects, DNS rebinding, token guessing,
scope changes, copied cookies, log forging, odd CSRF tokens, and the answers a script or a
proxy gets (JSON errors, a prefix, forwarded headers)."""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
from pools import free_port
from webtools import READ_TOKEN, WRITE_TOKEN, bearer, make_failed, serve, token_file

from qless_pool.web import create_app
from qless_pool.web.app import LoggedOut
from qless_pool.web.tokens import TokenError, TokenFile, hash_token

pytestmark = pytest.mark.timeout(60)
COOKIE = "qless_pool_session"


def csrf_of(browser) -> str:
    with browser.session_transaction() as session:
        return session["csrf"]


def logged_in(app, token: str = WRITE_TOKEN):
    """A browser client of ``app`` logged in with ``token``."""
    browser = app.test_client()
    form = browser.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    answer = browser.post("/login", data={"csrf": csrf, "token": token})
    assert answer.status_code == 302, answer.get_data(as_text=True)
    return browser


def touch(path) -> None:
    """Make the file's change visible to the token file's stamp (same size, same second)."""
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)


# --- after logging in -----------------------------------------------------------------------------

HOSTILE_NEXT = [
    "//evil.example/",
    "/\t/evil.example",  # browsers drop tabs and newlines in a Location: //evil.example
    "/\n/evil.example",
    "/\r\n/evil.example",
    "/\\evil.example",
    "https://evil.example/",
    "/ /evil.example",
    "/\x00/evil.example",
    "/\u2028/evil.example",
    "evil.example",
]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_login_goes_back_only_to_a_path_of_the_dashboard(redis_url, tmp_path, target):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    browser = app.test_client()
    browser.get("/login")
    answer = browser.post(
        "/login", data={"csrf": csrf_of(browser), "token": WRITE_TOKEN, "next": target}
    )
    assert (answer.status_code, answer.headers["Location"]) == (302, "/")


def test_login_goes_back_to_a_page_whose_name_has_a_space(redis_url, tmp_path):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    browser = app.test_client()
    to_login = browser.get("/queues/my%20queue")
    assert to_login.headers["Location"].endswith("next=/queues/my%2520queue")  # quoted once more
    browser.get(to_login.headers["Location"])
    answer = browser.post("/login", data={"csrf": csrf_of(browser), "token": WRITE_TOKEN,
                                          "next": "/queues/my%20queue"})  # fmt: skip
    assert answer.headers["Location"] == "/queues/my%20queue"


def test_login_goes_back_to_the_page_it_came_from(redis_url, tmp_path):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    browser = app.test_client()
    to_login = browser.get("/queues/caf%C3%A9?state=running")
    assert "/login?next=/queues/caf" in to_login.headers["Location"]
    browser.get(to_login.headers["Location"])
    answer = browser.post("/login", data={"csrf": csrf_of(browser), "token": WRITE_TOKEN,
                                          "next": "/queues/café?state=running"})  # fmt: skip
    assert answer.headers["Location"] == "/queues/caf%C3%A9?state=running"


# --- tokens ---------------------------------------------------------------------------------------


def test_a_scope_changed_in_the_file_holds_at_the_next_request(redis_url, client, tmp_path):
    write_line = hash_token(WRITE_TOKEN, "write")
    tokens = token_file(tmp_path, write_line + " alice")
    api = create_app(redis_url, token_file=str(tokens)).test_client()
    browser = logged_in(create_app(redis_url, token_file=str(tokens)))
    make_failed(client, "mail", "mail-Err", 1)
    assert api.post("/api/queues/mail/pause", headers=bearer(WRITE_TOKEN)).status_code == 200
    # The same hash, now read: the remembered token and the logged-in browser both lose "write".
    tokens.write_text(write_line.replace("write ", "read  ", 1) + " alice\n")
    touch(tokens)
    refused = api.post("/api/queues/mail/unpause", headers=bearer(WRITE_TOKEN))
    assert refused.status_code == 403 and "read token" in refused.get_json()["error"]
    page = browser.post("/queues/mail/unpause", data={"csrf": csrf_of(browser)})
    assert page.status_code == 403
    assert client.queues["mail"].counts["paused"] is True
    assert "alice (read)" in browser.get("/failed").get_data(as_text=True)


def test_a_wrong_token_is_checked_once_and_logged(tmp_path, caplog):
    tokens = TokenFile(str(token_file(tmp_path)))
    assert tokens.check("a-wrong-token-0123456789") is None
    assert list(tokens._wrong) != []  # remembered as wrong: a repeat costs no scrypt
    assert tokens.check("a-wrong-token-0123456789") is None
    assert tokens.check(WRITE_TOKEN).scope == "write"
    # A new file forgets what was wrong (the token may be in it now).
    path = token_file(tmp_path, hash_token("a-wrong-token-0123456789", "read") + " late")
    touch(path)
    assert tokens.check("a-wrong-token-0123456789").name == "late"


def test_open_pages_check_no_bearer_token_and_the_login_form_needs_its_csrf(
    redis_url, tmp_path, caplog
):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    browser = app.test_client()
    wrong = bearer("guess-guess-guess-0123456789")
    with caplog.at_level(logging.WARNING, logger="qless_pool.web"):
        assert browser.get("/login", headers=wrong).status_code == 200
        assert browser.get("/static/app.css", headers=wrong).status_code == 200
        assert not [r for r in caplog.records if "wrong" in r.getMessage()]
        # A Bearer header (even a wrong one) does not stand in for the form's CSRF token.
        forged = browser.post("/login", data={"token": WRITE_TOKEN}, headers=wrong)
        assert forged.status_code == 403
        assert browser.get("/api/queues", headers=wrong).status_code == 401
        browser.post("/login", data={"csrf": csrf_of(browser), "token": "nope-nope-0123456789"})
    said = [r.getMessage() for r in caplog.records]
    assert any("a wrong Bearer token from" in line for line in said)
    assert any("a wrong token in the login form from" in line for line in said)


def test_a_flood_of_new_tokens_is_answered_at_once_not_queued(redis_url, tmp_path):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    tokens = app.extensions["qless_pool"].tokens
    api = app.test_client()
    assert api.get("/api/queues", headers=bearer(READ_TOKEN)).status_code == 200  # remembered
    browser = logged_in(app)
    tokens._checking.acquire()  # another request's check, taking long
    try:
        busy = api.get("/api/queues", headers=bearer("another-new-token-0123456789"))
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert "try again" in busy.get_json()["error"]
        # Who needs no check is served meanwhile: a remembered token, a browser's session.
        assert api.get("/api/queues", headers=bearer(READ_TOKEN)).status_code == 200
        assert browser.get("/failed").status_code == 200
        assert api.get("/static/app.css").status_code == 200
    finally:
        tokens._checking.release()
    assert api.get("/api/queues", headers=bearer(WRITE_TOKEN)).status_code == 200


def test_a_token_file_asking_for_too_dear_a_hash_is_refused(tmp_path):
    line = hash_token(WRITE_TOKEN, "write").replace("$16384$", "$4194304$", 1)
    with pytest.raises(TokenError, match="line 1: scrypt n=4194304 r=8 p=1 asks for more than"):
        TokenFile(str(token_file(tmp_path, line)))


# --- sessions -------------------------------------------------------------------------------------


def test_log_out_ends_the_session_also_for_a_copy_of_its_cookie(redis_url, tmp_path):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    browser = logged_in(app)
    copy = browser.get_cookie(COOKIE).value
    thief = app.test_client()
    thief.set_cookie(COOKIE, copy)
    assert thief.get("/failed").status_code == 200
    assert browser.post("/logout", data={"csrf": csrf_of(browser)}).status_code == 302
    assert thief.get("/failed").status_code == 302  # to the login form
    assert "/login" in thief.get("/failed").headers["Location"]
    assert thief.get("/api/queues").status_code == 401
    assert logged_in(app).get("/failed").status_code == 200  # a new login works


def test_logged_out_sessions_are_forgotten_when_their_cookie_would_have_expired():
    logged_out = LoggedOut()
    logged_out._until = {f"old-{n}": 1.0 for n in range(100)}  # expired long ago
    logged_out.add("new")
    assert "new" in logged_out and len(logged_out._until) == 100 - 64 + 1
    logged_out.add("newer")
    assert len(logged_out._until) == 2 and "old-99" not in logged_out


def test_an_odd_csrf_token_is_refused_not_an_error(web_app, client):
    browser = web_app.test_client()
    browser.get("/")
    make_failed(client, "mail", "mail-Err", 1)
    for odd in ("é" * 43, "\x00", "x" * 5000):
        answer = browser.post("/queues/mail/pause", data={"csrf": odd})
        assert answer.status_code == 403, odd
    assert client.queues["mail"].counts["paused"] is False


@pytest.fixture
def web_app(redis_url):
    return create_app(redis_url)


def test_the_login_page_says_why_plain_http_on_a_network_address_cannot_log_in(redis_url, tmp_path):
    app = create_app(redis_url, token_file=str(token_file(tmp_path)))
    remote = app.test_client().get("/login", base_url="http://dash.example:5151")
    assert 'id="plain-http"' in remote.get_data(as_text=True)
    secure = app.test_client().get("/login", base_url="https://dash.example")
    assert 'id="plain-http"' not in secure.get_data(as_text=True)
    local = app.test_client().get("/login", base_url="http://127.0.0.1:5151")
    assert 'id="plain-http"' not in local.get_data(as_text=True)


# --- DNS rebinding --------------------------------------------------------------------------------


def test_without_a_token_file_only_loopback_names_are_answered(redis_url, tmp_path):
    open_app = create_app(redis_url).test_client()
    for base in ("http://localhost:5151", "http://127.0.0.1:5151", "http://[::1]:5151",
                 "http://LOCALHOST.:5151", "http://127.0.0.2:5151",
                 "http://[::ffff:127.0.0.1]:5151"):  # fmt: skip
        assert open_app.get("/api/queues", base_url=base).status_code == 200, base
    rebound = open_app.get("/api/queues", base_url="http://evil.example:5151")
    assert rebound.status_code == 403 and "evil.example" in rebound.get_json()["error"]
    page = open_app.get("/", base_url="http://evil.example")
    assert page.status_code == 403 and "loopback names only" in page.get_data(as_text=True)
    everywhere = create_app(redis_url, read_only=True, hosts=["*"]).test_client()
    assert everywhere.get("/api/queues", base_url="http://dash.example").status_code == 200
    named = create_app(redis_url, hosts=["dash.example"]).test_client()
    assert named.get("/api/queues", base_url="http://dash.example").status_code == 200
    assert named.get("/api/queues", base_url="http://localhost").status_code == 403
    with_tokens = create_app(redis_url, token_file=str(token_file(tmp_path))).test_client()
    answer = with_tokens.get("/api/queues", base_url="http://dash.example", headers=bearer(
        READ_TOKEN))  # fmt: skip
    assert answer.status_code == 200


# --- what the log and the pages say ---------------------------------------------------------------


def test_a_name_with_a_newline_cannot_forge_a_log_line(web_app, client, caplog):
    jid = client.queues["mail"].put("testjobs.Noop", {})
    forged = "x\n2026-01-01 qless_pool.web INFO alice: cancel all"
    browser = web_app.test_client()
    with caplog.at_level(logging.INFO, logger="qless_pool.web"):
        assert browser.post(f"/api/jobs/{jid}/tag", json={"tags": [forged]}).status_code == 200
    [line] = [r.getMessage() for r in caplog.records if ": tag " in r.getMessage()]
    assert "\n" not in line and "x\\n2026-01-01" in line
    moved = browser.post(f"/api/jobs/{jid}/move", json={"queue": forged})
    assert moved.status_code == 400 and "printable" in moved.get_json()["error"]
    not_a_name = browser.post(f"/api/jobs/{jid}/move", json={"queue": {"a": 1}})
    assert not_a_name.status_code == 400 and "a string" in not_a_name.get_json()["error"]
    assert client.jobs[jid].queue_name == "mail"


def test_data_keys_are_hidden_in_any_case_and_spelling_and_more_can_be_added(web_app, client):
    data = {"accessKey": "a1", "PRIVATE-KEY": "p1", "sessionKey": "s1", "Api_Token": "t1",
            "user": "ann", "nested": [{"clientSecret": "c1", "passphrase": "x"}]}  # fmt: skip
    jid = client.queues["mail"].put("testjobs.Noop", data)
    shown = web_app.test_client().get(f"/api/jobs/{jid}").get_json()["data"]
    assert shown == {"accessKey": "[hidden]", "PRIVATE-KEY": "[hidden]",
                     "sessionKey": "[hidden]", "Api_Token": "[hidden]", "user": "ann",
                     "nested": [{"clientSecret": "[hidden]", "passphrase": "[hidden]"}]}  # fmt: skip


def test_hide_data_keys_adds_to_the_default_ones(redis_url, client):
    jid = client.queues["mail"].put("testjobs.Noop", {"user": "ann", "password": "pw"})
    shown = create_app(redis_url, hide_data_keys=["USER"]).test_client()
    assert shown.get(f"/api/jobs/{jid}").get_json()["data"] == {
        "user": "[hidden]", "password": "[hidden]"
    }  # fmt: skip


def test_a_page_past_the_end_says_so(web_app, client):
    make_failed(client, "mail", "mail-Err", 3)
    body = web_app.test_client().get("/failed/mail-Err?offset=1000").get_data(as_text=True)
    assert "none here (3 in all)" in body and "1001\u2013" not in body


def test_cancel_goes_back_to_where_the_job_was_listed(web_app, client):
    browser = web_app.test_client()
    browser.get("/")
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    waiting = client.queues["mail"].put("testjobs.Noop", {})
    done = browser.post(f"/jobs/{failed}/cancel", data={"csrf": csrf_of(browser)})
    assert done.headers["Location"] == "/failed/mail-Err"
    done = browser.post(f"/jobs/{waiting}/cancel", data={"csrf": csrf_of(browser)})
    assert done.headers["Location"] == "/queues/mail"
    assert client.jobs[failed] is None and client.jobs[waiting] is None


def test_the_confirmation_is_not_offered_to_who_cannot_act(redis_url, client, tmp_path):
    make_failed(client, "mail", "mail-Err", 2)
    read_only = create_app(redis_url, read_only=True).test_client()
    answer = read_only.get("/failed/mail-Err/retry")
    assert answer.status_code == 403 and "read-only" in answer.get_data(as_text=True)
    reader = logged_in(create_app(redis_url, token_file=str(token_file(tmp_path))), READ_TOKEN)
    answer = reader.get("/failed/mail-Err/cancel")
    assert answer.status_code == 403 and "read token" in answer.get_data(as_text=True)


# --- what a script gets ---------------------------------------------------------------------------


def test_api_actions_as_json_need_no_csrf_token_and_errors_are_json(web_app, client):
    api = web_app.test_client()
    [failed] = make_failed(client, "mail", "mail-Err", 1)
    form = api.post(f"/api/jobs/{failed}/retry")  # a form post: what a hostile page can send
    assert form.status_code == 403 and "Content-Type: application/json" in form.get_json()["error"]
    assert client.jobs[failed].state == "failed"
    acted = api.post(f"/api/jobs/{failed}/retry", json={})
    assert acted.get_json() == {"count": 1}
    cross = api.post("/api/queues/mail/pause", json={}, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    for answer, status in [
        (api.get("/api/nothing-here"), 404),
        (api.get(f"/api/jobs/{failed}/retry"), 405),
        (api.post(f"/api/jobs/{failed}/move", json={"queue": "y" * 70_000}), 413),
    ]:
        assert answer.status_code == status and answer.is_json, answer.get_data(as_text=True)
        assert answer.get_json()["error"]
    assert "POST" in api.get(f"/api/jobs/{failed}/retry").headers["Allow"]
    assert api.get("/nothing-here").content_type.startswith("text/html")


def test_a_wrong_redis_password_is_said_as_such(redis_with_password):
    url = redis_with_password.url().replace("secretpw", "wrongpw")
    browser = create_app(url).test_client()
    answer = browser.get("/api/queues")
    assert answer.status_code == 503
    error = answer.get_json()["error"]
    assert "refused the dashboard's password" in error and "wrongpw" not in error


def test_an_action_that_meets_redis_away_does_not_refresh_into_a_get(tmp_path):
    from redis_server import RedisServer

    server = RedisServer().start()
    try:
        browser = create_app(server.url()).test_client()
        browser.get("/")
        server.stop()
        answer = browser.post("/queues/mail/pause", data={"csrf": csrf_of(browser)})
        assert answer.status_code == 503
        assert 'http-equiv="refresh"' not in answer.get_data(as_text=True)
        assert 'http-equiv="refresh"' in browser.get("/").get_data(as_text=True)
    finally:
        server.remove()


# --- served behind a proxy ------------------------------------------------------------------------


def test_served_behind_a_proxy_under_a_prefix(redis_url, client, tmp_path):
    client.queues["mail"].put("testjobs.Noop", {})
    tokens = token_file(tmp_path)
    served = serve(redis_url, free_port(), tmp_path / "web.log", "--behind-proxy",
                   "--token-file", str(tokens), prefix="/qless")  # fmt: skip
    try:
        assert served.get("/api/queues", bearer(READ_TOKEN))[0] == 200
        outside = served.base.replace("/qless", "/elsewhere")
        served_outside = type(served)(served.process, outside, served.log)
        assert served_outside.get("/")[0] == 404  # waitress alone would serve it
        # A forged X-Forwarded-Host does not make another site's Origin look like ours.
        forged = served.ask("POST", "/api/queues/mail/pause", {
            **bearer(WRITE_TOKEN), "Origin": "http://evil.example",
            "X-Forwarded-Host": "evil.example", "Content-Type": "application/json",
        }, b"{}")  # fmt: skip
        assert forged[0] == 403 and "another site" in forged[2]
        assert client.queues["mail"].counts["paused"] is False
        # The proxy's X-Forwarded-Proto is trusted: the login cookie is Secure behind TLS.
        _, headers, _ = served.get("/login", {"X-Forwarded-Proto": "https"})
        assert "Secure" in headers["Set-Cookie"] and "Path=/qless/" in headers["Set-Cookie"]
    finally:
        served.stop()
