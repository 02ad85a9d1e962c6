"""Secrets stay secret, SQL is never built from request data, size limits act before reading."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import SOURCES
from tests.servers import gunicorn

APP = Path(__file__).resolve().parent.parent / "app"

LOG_SECRET = "whsec-LOGTEST-7f3a9c2e51d84b06"
ROTATED_SECRET = "whsec-ROTATED-0b8e4d1c93a7f625"
MARKER = "PAYLOAD-MARKER-5e1c"
LIMIT = 2048

LOG_SOURCES: dict[str, Any] = {
    "plugins": SOURCES["plugins"],
    "sources": {
        **SOURCES["sources"],
        # The recorder plugin handles acme; the secret list covers rotation.
        "acme": {**SOURCES["sources"]["acme"], "secret": [LOG_SECRET, ROTATED_SECRET]},
        "batched": {**SOURCES["sources"]["batched"], "secret": LOG_SECRET},
        "small": {
            "scheme": "hmac-sha256",
            "secret": LOG_SECRET,
            "event_id": "body:id",
            "max_body_bytes": LIMIT,
        },
    },
}

# Every logger at DEBUG, to stderr, in the master and the workers; access log too.
LOG_CONFIG = """
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "DEBUG", "handlers": ["everything"]},
    "loggers": {
        "gunicorn.error": {"level": "DEBUG", "handlers": ["everything"], "propagate": False},
        "gunicorn.access": {"level": "DEBUG", "handlers": ["everything"], "propagate": False},
        # SQLAlchemy sets its own loggers to WARNING; an operator debugging turns them up.
        "sqlalchemy": {"level": "DEBUG"},
        "sqlalchemy.engine": {"level": "DEBUG"},
        "sqlalchemy.pool": {"level": "DEBUG"},
        "alembic": {"level": "DEBUG"},
        "werkzeug": {"level": "DEBUG"},
        "idemhook": {"level": "DEBUG"},
    },
    "handlers": {
        "everything": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "full",
        }
    },
    "formatters": {"full": {"format": "%(levelname)s %(name)s %(message)s"}},
}
accesslog = "-"
loglevel = "debug"
"""


def sign(body: bytes, secret: str = LOG_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Traffic:
    """Sends a full run's worth of deliveries and remembers what must never be logged."""

    def __init__(self, post) -> None:
        self.post = post
        self.signatures: list[str] = []
        self.answers: list[tuple[int, str]] = []

    def send(self, source: str, body: bytes, signature: str | None = None, **headers: str):
        signature = signature if signature is not None else sign(body)
        if len(signature) > 20:
            self.signatures.append(signature.removeprefix("sha256="))
        status, data = self.post(
            f"/webhooks/{source}",
            body,
            {"Content-Type": "application/json", "X-Signature": signature, **headers},
        )
        self.answers.append((status, data.get("error") or data.get("status")))

    def run(self, fail) -> None:
        event = {"id": "sec-1", "type": "contact.updated", "email": f"{MARKER}-email@x.test"}
        body = json.dumps(event).encode()
        self.send("acme", body)  # processed
        self.send("acme", body)  # duplicate
        self.send("acme", body, sign(body, ROTATED_SECRET))  # duplicate, rotated secret
        fail("sec-2")
        failing = {"id": "sec-2", "type": "contact.created", "note": f"{MARKER}-failing"}
        self.send("acme", json.dumps(failing).encode())  # handler fails: 500
        batch = [
            {"id": "sec-b1", "type": "t", "n": f"{MARKER}-batch"},
            {"id": "sec-2", "type": "t", "n": f"{MARKER}-batch-failing"},
        ]
        self.send("batched", json.dumps(batch).encode())  # one of two fails: 500
        self.send("acme", body, sign(body, "not-the-secret"))  # 401
        self.send("acme", body, sign(body)[:30])  # 401, truncated
        self.send("acme", f'{{"id": "sec-3", "x": "{MARKER}-broken'.encode())  # 400
        self.send("acme", json.dumps({"type": "t", "m": f"{MARKER}-noid"}).encode())  # 400
        self.send("acme", b'{"id": "sec-4", "v": 1e999, "m": "' + MARKER.encode() + b'"}')
        self.send("small", json.dumps({"id": "sec-5", "pad": MARKER * 200}).encode())  # 413
        self.send("nope", json.dumps({"id": "sec-6", "m": MARKER}).encode())  # 404
        self.send(
            "acme",
            json.dumps({"id": "sec-7", "type": "contact.x", "m": f"{MARKER}-\u0000"}).encode(),
            Authorization=f"Bearer {MARKER}-token",
        )  # processed, JSONB-wrapped payload


def assert_nothing_secret(log: str, traffic: Traffic) -> None:
    assert log.strip(), "no log output was captured"
    for secret in (LOG_SECRET, ROTATED_SECRET, "not-the-secret"):
        assert secret not in log
    for signature in traffic.signatures:
        assert signature not in log and signature[:16] not in log
    assert MARKER not in log
    assert "@x.test" not in log


def test_no_secret_signature_or_payload_in_any_log_line_of_a_gunicorn_run(pg_url, sql):
    with gunicorn(LOG_SOURCES, pg_url, workers=2, config=LOG_CONFIG) as server:

        def post(path: str, body: bytes, headers: dict[str, str]):
            answer = requests.post(server.url + path, data=body, headers=headers, timeout=30)
            return answer.status_code, answer.json()

        traffic = Traffic(post)
        try:
            traffic.run(
                lambda event_id: sql("INSERT INTO test_failures VALUES (:e, 'down')", e=event_id)
            )
            log = server.log()
        finally:
            sql("TRUNCATE processed_events, delivery_failures, test_effects, test_failures")

    # The run did reach every path worth logging.
    statuses = {status for status, _ in traffic.answers}
    assert {200, 400, 401, 404, 413, 500} <= statuses
    assert "sec-1" in log  # the event log line (IDs are not secret)
    assert "POST /webhooks/acme" in log  # the access log
    assert "DEBUG" in log
    assert "INSERT INTO processed_events" in log  # SQLAlchemy's statement log was on
    assert_nothing_secret(log, traffic)


@pytest.fixture
def every_logger_at_debug(caplog):
    """Every logger, including those that set their own level (SQLAlchemy's), at DEBUG."""
    caplog.set_level(logging.DEBUG)
    import sqlalchemy  # noqa: F401  (its loggers exist once it is imported)

    names = ["sqlalchemy", *logging.root.manager.loggerDict]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield caplog
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_no_secret_signature_or_payload_in_python_logging_at_debug(
    make_app, sql, every_logger_at_debug
):
    caplog = every_logger_at_debug
    app = make_app(LOG_SOURCES)
    client = app.test_client()

    def post(path: str, body: bytes, headers: dict[str, str]):
        answer = client.post(path, data=body, headers=headers)
        return answer.status_code, answer.json

    traffic = Traffic(post)
    traffic.run(lambda event_id: sql("INSERT INTO test_failures VALUES (:e, 'down')", e=event_id))

    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    log = "\n".join(formatter.format(record) for record in caplog.records)
    assert any(r.name == "idemhook.events" for r in caplog.records)
    assert any(r.name.startswith("sqlalchemy.engine") for r in caplog.records)
    # Structured fields travel with the record too (JSON log formatters print them).
    extras = "\n".join(repr(vars(record)) for record in caplog.records)
    assert_nothing_secret(log + extras, traffic)


# --- SQL built from strings ------------------------------------------------------------------

SQL_CALLS = {"execute", "exec_driver_sql", "text", "executemany", "executescript"}


def _formatted_sql(node: ast.expr) -> bool:
    """True if ``node`` builds a string from non-constant parts (other than int(...))."""
    if isinstance(node, ast.JoinedStr):
        return any(
            isinstance(part, ast.FormattedValue)
            and not (
                isinstance(part.value, ast.Call)
                and isinstance(part.value.func, ast.Name)
                and part.value.func.id == "int"
            )
            for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    ):
        return True
    return False


def test_no_sql_is_built_by_string_formatting():
    offenders = []
    for path in sorted(APP.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in SQL_CALLS and _formatted_sql(node.args[0]):
                offenders.append(f"{path.relative_to(APP.parent)}:{node.lineno}")
    assert offenders == [], "SQL built by string formatting; use bound parameters"


def test_the_sql_check_catches_formatting():
    for source in (
        "conn.execute(text(f\"SELECT * FROM t WHERE id = '{event_id}'\"))",
        'conn.execute("SELECT * FROM t WHERE id = %s" % event_id)',
        'conn.execute("SELECT * FROM t WHERE id = {}".format(event_id))',
        'conn.exec_driver_sql("SELECT * FROM t WHERE id = " + event_id)',
    ):
        call = ast.parse(source).body[0].value  # type: ignore[attr-defined]
        inner = call.args[0]
        if isinstance(inner, ast.Call) and getattr(inner.func, "id", None) == "text":
            inner = inner.args[0]
        assert _formatted_sql(inner), source
    assert not _formatted_sql(ast.parse('f"PRAGMA busy_timeout={int(ms)}"').body[0].value)  # type: ignore[attr-defined]


def test_signatures_and_tokens_are_never_compared_with_equality():
    # Verification must use matches_any / hmac.compare_digest: == leaks timing.
    suspicious = ("sig", "digest", "mac", "token", "secret", "expected", "given", "offered")
    offenders = []
    checked = [
        *sorted((APP / "_config" / "schemes").glob("*.py")),
        *(APP / "_web" / name for name in ("admin.py", "api.py", "metrics.py")),
        APP / "_web" / "dashboard" / "access.py",
    ]
    for path in checked:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                names = [
                    getattr(side, "id", None) or getattr(side, "attr", None)
                    for side in (node.left, *node.comparators)
                ]
                if any(n and any(s in n.lower() for s in suspicious) for n in names):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


# --- size limits act before the body is read -------------------------------------------------


@pytest.mark.gunicorn
def test_oversized_content_length_is_refused_without_waiting_for_the_body(pg_url, sql):
    with gunicorn(LOG_SOURCES, pg_url, workers=1) as server:
        host, port = server.url.removeprefix("http://").split(":")
        for source, declared in (("small", LIMIT + 1), ("acme", 200 * 1024 * 1024)):
            head = (
                f"POST /webhooks/{source} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nX-Signature: sha256=00\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
            # The body is never sent and the socket stays open: a server that read the body
            # first would wait here until the guard timeout instead of answering.
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(head)
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            status_line, _, rest = answer.partition(b"\r\n")
            assert status_line.split()[1] == b"413", answer[:200]
            body = json.loads(rest.partition(b"\r\n\r\n")[2])
            assert body["error"] == "payload_too_large"
            assert str(declared) in body["message"]
        # The worker that refused them still serves.
        ok = requests.post(
            f"{server.url}/webhooks/small",
            data=b'{"id": "after-413"}',
            headers={
                "Content-Type": "application/json",
                "X-Signature": sign(b'{"id": "after-413"}'),
            },
            timeout=30,
        )
        assert ok.status_code == 200
    sql("TRUNCATE processed_events")
