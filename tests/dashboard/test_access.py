"""Who may see and do what on the dashboard: login, session cookie, CSRF, headers, escaping."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
from itsdangerous import URLSafeTimedSerializer

from idemhook._values.errors import ConfigError
from idemhook._web.dashboard import access
from idemhook.testing import deliver
from tests.dashboard.conftest import HTML, TOKEN, Browser, csrf_of

PAGES = (
    "/dashboard",
    "/dashboard/events",
    "/dashboard/events?source=acme&type=contact.created",
    "/dashboard/events/acme/evt_1",
    "/dashboard/replay/acme/evt_1",
    "/dashboard/failures",
    "/dashboard/outbox",
)
ACTIONS = (
    "/dashboard/replay/acme/evt_1",
    "/dashboard/failures/retry",
    "/dashboard/outbox/retry",
    "/dashboard/logout",
)
HOSTILE = {
    "id": "evt_x",
    "type": "contact.created",
    "name": "<script>alert('name')</script>",
    "title": '"><img src=x onerror=alert(1)>',
    "<script>key</script>": "value",
}


def _effects(sql, event_id: str) -> int:
    return sql("SELECT count(*) FROM test_effects WHERE event_id = :e", e=event_id)[0][0]


def _replays(sql, event_id: str) -> int:
    return sql(
        "SELECT replay_count FROM processed_events WHERE event_id = :e", e=event_id
    )[0][0]


# -- off without a token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [*PAGES, "/dashboard/outbox/1", "/dashboard/login", "/dashboard/static/dashboard.css"]
)
def test_dashboard_is_404_without_an_admin_token(make_app, path):
    client = make_app().test_client()
    for headers in (HTML, {}):
        response = client.get(path, headers=headers)
        assert response.status_code == 404
        assert response.json["error"] == "not_found"
        assert "Set-Cookie" not in response.headers


def test_actions_are_404_without_an_admin_token(make_app):
    client = make_app().test_client()
    for path in (*ACTIONS, "/dashboard/login"):
        response = client.post(path, data={"token": ""}, headers=HTML)
        assert response.status_code == 404, path


# -- no page and no action without the session -----------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, "/dashboard/outbox/1"])
def test_a_browser_without_a_session_is_sent_to_the_login_form(client, path):
    deliver(client, "acme", {"id": "evt_1", "type": "contact.created"})
    response = client.get(path, headers=HTML)
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith("/dashboard/login?next=")
    assert "evt_1" not in response.get_data(as_text=True) or path.endswith("evt_1")
    login = client.get(location, headers=HTML)
    assert login.status_code == 200
    assert 'type="password"' in login.text


@pytest.mark.parametrize("path", [*PAGES, "/dashboard/outbox/1"])
def test_other_clients_without_a_session_get_401(client, path):
    deliver(client, "acme", {"id": "evt_1", "type": "contact.created"})
    for headers in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.json["error"] == "login_required"
        assert "evt_1" not in response.get_data(as_text=True)


@pytest.mark.parametrize("path", ACTIONS)
def test_no_action_without_the_session(client, sql, path):
    deliver(client, "acme", {"id": "evt_1", "type": "contact.created"})
    # The admin token itself is no substitute for the session, nor is a bearer header.
    for headers in ({}, HTML, {"Authorization": f"Bearer {TOKEN}"}):
        response = client.post(path, data={"failure": "1", "message": "1"}, headers=headers)
        assert response.status_code in (401, 303), response.status_code
    assert _replays(sql, "evt_1") == 0
    assert _effects(sql, "evt_1") == 1


def test_a_wrong_token_does_not_log_in(client):
    b = Browser(client)
    form = client.get("/dashboard/login", headers=HTML)
    response = client.post(
        "/dashboard/login",
        data={"csrf_token": csrf_of(form.text), "token": TOKEN + "x"},
        headers=HTML,
    )
    assert response.status_code == 303
    again = client.get(response.headers["Location"], headers=HTML)
    assert "That is not the admin token" in again.text
    assert b.get("/dashboard").status_code == 303


def test_a_cookie_signed_with_another_key_is_not_a_session(client, app):
    other = URLSafeTimedSerializer(
        b"not the key",
        salt=access.DashboardSessions.salt,
        signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha256},
    )
    forged = other.dumps({"admin": "x", "at": int(time.time()), "csrf": "c"})
    client.set_cookie(access.COOKIE, forged, path="/dashboard")
    assert client.get("/dashboard", headers=HTML).status_code == 303


def _cookie(app, data: dict) -> str:
    with app.test_request_context("/dashboard"):
        return access.DashboardSessions().get_signing_serializer(app).dumps(data)


def test_a_session_ends_after_its_lifetime(client, app):
    b = Browser(client)
    b.login()
    with app.test_request_context("/dashboard"):
        owner = access.token_id(app.config)
    fresh = _cookie(app, {"admin": owner, "at": int(time.time()), "csrf": "c"})
    stale = _cookie(
        app, {"admin": owner, "at": int(time.time() - access.LIFETIME.total_seconds() - 60)}
    )
    client.set_cookie(access.COOKIE, fresh, path="/dashboard")
    assert client.get("/dashboard", headers=HTML).status_code == 200
    client.set_cookie(access.COOKIE, stale, path="/dashboard")
    assert client.get("/dashboard", headers=HTML).status_code == 303


def test_changing_the_admin_token_logs_every_session_out(browser, app):
    assert browser.get("/dashboard").status_code == 200
    app.config["IDEMHOOK_ADMIN_TOKEN"] = "another-admin-token-0123456789"
    assert browser.get("/dashboard").status_code == 303


def test_sessions_signed_with_the_secret_key_when_it_is_set(make_app):
    key = "k" * 40
    app = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN, IDEMHOOK_SECRET_KEY=key)
    b = Browser(app.test_client())
    b.login()
    cookie = b.client.get_cookie(access.COOKIE, path="/dashboard")
    signer = URLSafeTimedSerializer(
        key.encode(),
        salt=access.DashboardSessions.salt,
        signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha256},
    )
    assert "at" in signer.loads(cookie.value)
    # The same token on an app with the derived key does not accept that cookie.
    derived = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN).test_client()
    derived.set_cookie(access.COOKIE, cookie.value, path="/dashboard")
    assert derived.get("/dashboard", headers=HTML).status_code == 303


def test_a_short_secret_key_stops_start_up(make_app):
    with pytest.raises(ConfigError, match="IDEMHOOK_SECRET_KEY"):
        make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN, IDEMHOOK_SECRET_KEY="short")


def test_logout_ends_the_session(browser):
    response = browser.post("/dashboard/logout")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard/login"
    for path in PAGES:
        assert browser.get(path).status_code == 303, path
    assert browser.client.get("/dashboard").status_code == 401


def test_login_returns_to_the_page_asked_for_and_nowhere_else(client):
    for target, expected in (
        ("/dashboard/failures?all=1", "/dashboard/failures?all=1"),
        ("https://evil.example/dashboard", "/dashboard"),
        ("//evil.example/dashboard", "/dashboard"),
        ("/dashboardx", "/dashboard"),
        ("/webhooks/acme", "/dashboard"),
    ):
        b = Browser(client)
        form = client.get("/dashboard/login", headers=HTML)
        response = client.post(
            "/dashboard/login",
            data={"csrf_token": csrf_of(form.text), "token": TOKEN, "next": target},
            headers=HTML,
        )
        assert response.headers["Location"] == expected, target
        b.client.delete_cookie(access.COOKIE, path="/dashboard")


# -- the cookie ------------------------------------------------------------------------------


def _set_cookie(response) -> str:
    return next(v for v in response.headers.getlist("Set-Cookie") if v.startswith(access.COOKIE))


def test_the_session_cookie_is_httponly_samesite_lax_and_scoped_to_the_dashboard(client):
    form = client.get("/dashboard/login", headers=HTML)
    response = client.post(
        "/dashboard/login",
        data={"csrf_token": csrf_of(form.text), "token": TOKEN},
        headers=HTML,
    )
    cookie = _set_cookie(response)
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    assert TOKEN not in cookie


def test_the_session_cookie_is_secure_over_https(client):
    form = client.get("/dashboard/login", headers=HTML, base_url="https://localhost")
    assert "Secure" in _set_cookie(form)
    response = client.post(
        "/dashboard/login",
        data={"csrf_token": csrf_of(form.text), "token": TOKEN},
        headers=HTML,
        base_url="https://localhost",
    )
    assert "Secure" in _set_cookie(response)


def test_webhook_deliveries_neither_read_nor_set_the_session_cookie(browser):
    response = deliver(browser.client, "acme", {"id": "evt_c", "type": "contact.created"})
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers
    assert "Cookie" not in response.headers.get("Vary", "")


# -- CSRF ------------------------------------------------------------------------------------


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(browser, sql):
    deliver(browser.client, "acme", {"id": "evt_1", "type": "contact.created"})
    sql("INSERT INTO test_failures VALUES ('evt_f', 'boom')")
    deliver(browser.client, "acme", {"id": "evt_f", "type": "contact.created"})
    sql("DELETE FROM test_failures")
    failure_id = sql("SELECT id FROM delivery_failures WHERE event_id = 'evt_f'")[0][0]
    for forged in (None, "", "x" * 43, browser.csrf[:-1]):
        data = {} if forged is None else {"csrf_token": forged}
        for path, extra in (
            ("/dashboard/replay/acme/evt_1", {}),
            ("/dashboard/failures/retry", {"only": str(failure_id)}),
            ("/dashboard/outbox/retry", {"only": "1"}),
            ("/dashboard/logout", {}),
        ):
            response = browser.post(path, {**data, **extra}, csrf=False)
            assert response.status_code == 403, path
            assert response.json["error"] == "csrf_failed"
    assert _replays(sql, "evt_1") == 0
    assert _effects(sql, "evt_1") == 1
    assert sql("SELECT count(*) FROM processed_events WHERE event_id = 'evt_f'")[0][0] == 0
    assert browser.get("/dashboard").status_code == 200  # and still logged in


def test_the_login_form_needs_its_csrf_token_too(client):
    response = client.post("/dashboard/login", data={"token": TOKEN}, headers=HTML)
    assert response.status_code == 403
    assert response.json["error"] == "csrf_failed"
    assert client.get("/dashboard", headers=HTML).status_code == 303


def test_the_csrf_token_of_another_session_is_refused(app, sql, browser):
    other = Browser(app.test_client())
    other.login()
    deliver(browser.client, "acme", {"id": "evt_1", "type": "contact.created"})
    response = browser.post("/dashboard/replay/acme/evt_1", {"csrf_token": other.csrf}, csrf=False)
    assert response.status_code == 403
    assert _replays(sql, "evt_1") == 0


# -- headers and escaping --------------------------------------------------------------------


def test_every_page_carries_a_strict_csp_and_refuses_framing(browser):
    deliver(browser.client, "acme", {"id": "evt_1", "type": "contact.created"})
    for path in (*PAGES, "/dashboard/login", "/dashboard/events/acme/missing"):
        response = browser.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "style-src 'self'" in csp and "script-src" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert re.fullmatch(r"app;dur=\d+\.\d", response.headers["Server-Timing"])
        if response.mimetype == "text/html":
            html = response.text
            assert "<script" not in html.lower(), path
            assert not re.search(r"<style|\sstyle=", html), path


def test_payloads_results_and_errors_render_as_text(browser, sql):
    deliver(browser.client, "acme", HOSTILE)
    reason = "<script>alert('traceback')</script>"
    sql("INSERT INTO test_failures VALUES ('evt_y', :r)", r=reason)
    deliver(browser.client, "acme", {**HOSTILE, "id": "evt_y"})
    hostile_id = '<img src=x onerror=alert("id")>'
    deliver(browser.client, "open", {}, headers={"X-Event-Id": hostile_id})
    pages = [
        browser.get("/dashboard/events/acme/evt_x"),
        browser.get("/dashboard/events/acme/evt_y"),
        browser.get("/dashboard/events"),
        browser.get("/dashboard/failures"),
        browser.get("/dashboard/events", query_string={"id": hostile_id, "source": "acme"}),
        browser.get(f"/dashboard/events/open/{hostile_id}"),
        browser.get("/dashboard/events", query_string={"type": "<script>x</script>"}),
    ]
    for page in pages:
        html = page.text
        assert page.status_code == 200
        for raw in ("<script", "<img", "onerror=alert(1)>"):
            assert raw not in html
    assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in pages[0].text
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages[0].text
    assert "&lt;script&gt;alert(&#39;traceback&#39;)&lt;/script&gt;" in pages[1].text
    assert "&lt;img src=x onerror=alert(&#34;id&#34;)&gt;" in pages[5].text


def test_no_secret_signature_or_admin_token_is_ever_shown(browser):
    deliver(
        browser.client,
        "acme",
        {"id": "evt_s", "type": "contact.created"},
        headers={"X-Custom": "shown", "X-Api-Token": "hidden-token-value"},
    )
    pages = [browser.get(p).text for p in (*PAGES, "/dashboard/events/acme/evt_s")]
    event_page = pages[-1]
    assert "X-Custom" in event_page and "shown" in event_page  # headers are shown...
    for page in pages:
        assert TOKEN not in page
        assert "test-secret" not in page  # the source's secret
        assert "X-Signature" not in page and "sha256=" not in page  # ...but no signature
        assert "hidden-token-value" not in page


def test_behind_a_path_prefix_the_cookie_and_the_return_address_keep_it(client):
    # A reverse proxy serving idemhook under /hooks (SCRIPT_NAME, as ProxyFix sets it).
    prefix = "http://localhost/hooks"
    first = client.get("/dashboard/failures", headers=HTML, base_url=prefix)
    assert first.headers["Location"] == "/hooks/dashboard/login?next=/hooks/dashboard/failures"
    form = client.get("/dashboard/login", headers=HTML, base_url=prefix)
    assert "Path=/hooks/dashboard" in _set_cookie(form)
    assert 'action="/hooks/dashboard/login"' in form.text
