"""The headers stored with an event and its failures never carry a secret."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from werkzeug.datastructures import EnvironHeaders, Headers
from werkzeug.test import EnvironBuilder

from idemhook._values.headers import (
    safe_headers,
)

SECRET_NAMES = ("X-Signature", "Authorization", "Cookie", "X-Hub-Signature-256", "X-Api-Token")
names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z")


@given(st.dictionaries(names, st.text(st.characters(min_codepoint=32, max_codepoint=126))))
def test_a_requests_headers_are_stored_as_werkzeug_names_them_without_secrets(headers):
    # The fast path reads the WSGI environ; it must agree with Werkzeug's own view.
    sent = {**headers, **dict.fromkeys(SECRET_NAMES, "s3cr3t")}
    environ = EnvironBuilder(method="POST", headers=sent, data=b"{}").get_environ()
    request_headers = EnvironHeaders(environ)
    expected = safe_headers(Headers(list(request_headers.items())))

    assert safe_headers(request_headers) == expected
    assert not any(name in expected for name in SECRET_NAMES)
    assert "s3cr3t" not in expected.values()
