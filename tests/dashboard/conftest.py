"""Fixtures of the dashboard's tests: an app with the dashboard on, a logged-in client."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient

TOKEN = "dashboard-admin-token-0123456789"
#: What a browser's navigation asks for.
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


@dataclass
class Browser:
    """A test client that logs in through the login form, as a person does."""

    client: FlaskClient
    csrf: str = ""

    def login(self, token: str = TOKEN) -> None:
        form = self.client.get("/dashboard/login", headers=HTML)
        answer = self.client.post(
            "/dashboard/login",
            data={"csrf_token": csrf_of(form.text), "token": token},
            headers=HTML,
        )
        assert answer.status_code == 303
        page = self.client.get("/dashboard", headers=HTML)
        assert page.status_code == 200, page.text
        self.csrf = csrf_of(page.text)

    def get(self, path: str, **kwargs):
        return self.client.get(path, headers=HTML, **kwargs)

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True):
        form = dict(data or {})
        if csrf:
            form["csrf_token"] = self.csrf
        return self.client.post(path, data=form, headers=HTML)


@pytest.fixture
def app(make_app) -> Flask:
    """The receiver with the dashboard on (an admin token is set)."""
    return make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN)


@pytest.fixture
def browser(app: Flask) -> Browser:
    """A logged-in client of ``app``."""
    b = Browser(app.test_client())
    b.login()
    return b
