"""Who may use the dashboard: the login session, its cookie, the CSRF token, the headers.

- Off (404 for every dashboard URL, static files included) unless
  ``IDEMHOOK_ADMIN_TOKEN`` is set.
- ``POST /dashboard/login`` with the admin token starts a session: a signed cookie
  (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when the request came over HTTPS,
  ``Path=/dashboard``) valid for :data:`LIFETIME` after the login. It is signed
  with ``IDEMHOOK_SECRET_KEY``, or with a key derived from the admin token when
  that is unset; either way the session names the admin token it was opened with
  (an HMAC of it), so changing the admin token logs every session out.
- Every ``POST`` carries the session's CSRF token (a hidden form field); a POST
  without it, or with another one, is answered 403 ``csrf_failed`` and changes
  nothing. The login form has one too (no login CSRF).
- Without a session a page redirects a browser to the login form (one that asks
  for ``text/html``) and answers other clients 401 ``login_required``.

The cookie is only read on dashboard URLs (:class:`DashboardSessions`): the
webhook path never pays for it, and the browser never sends it there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask, Request, current_app, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature, URLSafeTimedSerializer

from idemhook._values.errors import Forbidden, NotFound, Unauthorized

PREFIX = "/dashboard"
COOKIE = "idemhook_dashboard"
#: How long a login lasts, whatever happens in between (documented in docs/dashboard.md).
LIFETIME = timedelta(hours=12)
CSRF_FIELD = "csrf_token"
#: What the derived signing key is derived for (HMAC-SHA256 keyed with the admin token).
_DERIVATION = b"idemhook dashboard session signing key v1"


def signing_key(config: Any) -> bytes:
    """``IDEMHOOK_SECRET_KEY``, or HMAC-SHA256(admin token, a fixed label) when it is unset."""
    secret = config.get("IDEMHOOK_SECRET_KEY")
    if secret:
        return str(secret).encode()
    token = str(config.get("IDEMHOOK_ADMIN_TOKEN") or "")
    return hmac.new(token.encode(), _DERIVATION, hashlib.sha256).digest()


def token_id(config: Any) -> str:
    """Which admin token a session was opened with, without revealing it."""
    token = str(config.get("IDEMHOOK_ADMIN_TOKEN") or "")
    return hmac.new(signing_key(config), b"admin:" + token.encode(), hashlib.sha256).hexdigest()


def is_dashboard(req: Request) -> bool:
    return req.path == PREFIX or req.path.startswith(PREFIX + "/")


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, for dashboard URLs only, with their own key and cookie."""

    salt = "idemhook-dashboard-session"

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(
            signing_key(app.config),
            salt=self.salt,
            serializer=self.serializer,
            signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha256},
        )

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not is_dashboard(request) or not app.config.get("IDEMHOOK_ADMIN_TOKEN"):
            return None  # Flask's null session: nothing read, nothing written
        value = request.cookies.get(COOKIE)
        if not value:
            return self.session_class()
        try:
            data = self.get_signing_serializer(app).loads(
                value, max_age=int(LIFETIME.total_seconds())
            )
        except BadSignature:
            return self.session_class()
        return self.session_class(data)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE

    def get_cookie_domain(self, app: Flask) -> str | None:
        return None

    def get_cookie_path(self, app: Flask) -> str:
        return request.script_root + PREFIX

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_secure(self, app: Flask) -> bool:
        # Behind a TLS-terminating proxy this is right once IDEMHOOK_TRUSTED_PROXIES is set.
        return request.is_secure

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Lax"

    def get_cookie_partitioned(self, app: Flask) -> bool:
        return False

    def get_expiration_time(self, app: Flask, session: Any) -> datetime | None:
        started = session.get("at")
        if not isinstance(started, int | float):
            return None  # not logged in: a browser-session cookie holding the CSRF token
        return datetime.fromtimestamp(started, UTC) + LIFETIME


# -- the session ---------------------------------------------------------------------------


def csrf_token() -> str:
    """The session's CSRF token (made on first use); every form of the dashboard sends it."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def logged_in() -> bool:
    started = session.get("at")
    owner = session.get("admin")
    if not isinstance(started, int | float) or not isinstance(owner, str):
        return False
    if time.time() - started > LIFETIME.total_seconds():
        return False
    return hmac.compare_digest(owner, token_id(current_app.config))


def log_in() -> None:
    """Start a logged-in session (a fresh CSRF token: nothing from before the login is kept)."""
    session.clear()
    session["admin"] = token_id(current_app.config)
    session["at"] = int(time.time())
    csrf_token()


def log_out() -> None:
    session.clear()


def require_enabled() -> None:
    if not current_app.config.get("IDEMHOOK_ADMIN_TOKEN"):
        raise NotFound(
            "Not found. (The dashboard is off until IDEMHOOK_ADMIN_TOKEN is set.)",
            code="not_found",
        )


def wants_html() -> bool:
    """A browser (asks for HTML before JSON); curl's ``*/*`` and API clients get JSON."""
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html"


def login_required() -> Unauthorized:
    return Unauthorized(
        "Log in first: POST the admin token to /dashboard/login (the login form), "
        "then send the session cookie it sets.",
        code="login_required",
    )


def check_csrf() -> None:
    """Refuse a POST that does not carry this session's CSRF token."""
    expected = session.get("csrf")
    given = request.form.get(CSRF_FIELD, "")
    if not (isinstance(expected, str) and hmac.compare_digest(given.encode(), expected.encode())):
        raise Forbidden(
            "The form's CSRF token is missing or is not this session's: reload the page "
            "and submit the form again.",
            code="csrf_failed",
        )


#: Sent with every dashboard response: no script at all, styles only from our own file,
#: no framing (clickjacking), nothing cached (pages hold payloads).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def safe_next(target: str | None) -> str | None:
    """A path inside the dashboard to return to after login, or None (no open redirect)."""
    if not target:
        return None
    root = request.script_root + PREFIX
    if (
        target.startswith(("//", "/\\"))
        or "\\" in target
        or not (target == root or target.startswith(root + "/") or target.startswith(root + "?"))
    ):
        return None
    return target
