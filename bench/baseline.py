"""The bare minimum: what nothing can beat, served under the receiver's gunicorn settings.

A Flask view that checks the HMAC with ``hmac.compare_digest``, parses the JSON
for the event ID, runs ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` into the
same ``processed_events`` table (payload stored), the handler's one-row UPDATE
for a new event, commits, and returns JSON. Raw psycopg2, one connection per
thread, no ORM, no registry, no logging, no metrics. A batch (``/webhooks/*_batch``)
is one transaction with the same two statements per event.

An API source (``/webhooks/*_api``, the ``idempotency-key`` scenarios) is the bare
minimum of an idempotency key: the HMAC over key, ``.`` and body, ``INSERT ... ON
CONFLICT DO NOTHING RETURNING``; a new key runs the UPDATE and stores its answer (201,
body, ``Location``) with the claim; a known key answers the stored one, replayed. No
fingerprint, no client, no expiry, no in-flight answer (a concurrent retry waits).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading

import psycopg2
from flask import Flask, jsonify, request

from .handler import UPDATE_SQL

CLAIM_SQL = (
    "INSERT INTO processed_events (source, event_id, event_type, status, received_at, "
    "payload, duplicate_count, last_seen_at) "
    "VALUES (%(source)s, %(event_id)s, %(event_type)s, 'processed', now(), %(payload)s, 0, now()) "
    "ON CONFLICT (source, event_id) DO NOTHING RETURNING id"
)


KEY_CLAIM_SQL = (
    "INSERT INTO processed_events (source, event_id, event_type, status, received_at, "
    "payload, duplicate_count, last_seen_at) "
    "VALUES (%(source)s, %(event_id)s, NULL, 'processed', now(), %(payload)s, 0, now()) "
    "ON CONFLICT (source, event_id) DO NOTHING RETURNING id"
)
KEY_STORE_SQL = (
    "UPDATE processed_events SET result = %(result)s, response_status = 201, "
    "response_headers = %(headers)s, processed_at = now() WHERE id = %(id)s"
)
KEY_READ_SQL = (
    "SELECT response_status, result, response_headers FROM processed_events "
    "WHERE source = %(source)s AND event_id = %(event_id)s"
)


def create_app() -> Flask:
    """Build the baseline app from BENCH_DSN (a libpq DSN) and BENCH_SECRET."""
    app = Flask(__name__)
    dsn = os.environ["BENCH_DSN"]
    secret = os.environ["BENCH_SECRET"].encode()
    local = threading.local()

    def connection() -> psycopg2.extensions.connection:
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = local.conn = psycopg2.connect(dsn)
        return conn

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.post("/webhooks/<source>")
    def receive(source: str):
        if source.endswith("_api"):
            return operation(source)
        body = request.get_data()
        given = request.headers.get("X-Signature", "")
        if given.startswith("sha256="):
            given = given[7:]
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            return jsonify({"error": "invalid_signature", "message": "bad signature"}), 401
        payload = json.loads(body)
        batch = source.endswith("_batch")
        events = payload if batch else [payload]
        conn = connection()
        outcomes = []
        with conn, conn.cursor() as cur:  # commits on success, rolls back on error
            for event in events:
                cur.execute(
                    CLAIM_SQL,
                    {
                        "source": source,
                        "event_id": event["id"],
                        "event_type": event["type"],
                        # A single event's body is its JSON already; a batch item is re-encoded.
                        "payload": json.dumps(event) if batch else body.decode(),
                    },
                )
                new = cur.fetchone() is not None
                if new:
                    cur.execute(
                        UPDATE_SQL, {"event_id": event["id"], "account": int(event["account"])}
                    )
                outcomes.append(
                    {"event_id": event["id"], "status": "processed" if new else "duplicate"}
                )
        if batch:
            return jsonify({"status": "ok", "events": outcomes})
        return jsonify(outcomes[0])

    def operation(source: str):
        body = request.get_data()
        key = request.headers.get("Idempotency-Key", "")
        given = request.headers.get("X-Signature", "").removeprefix("sha256=")
        expected = hmac.new(secret, key.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not key or not hmac.compare_digest(expected.encode(), given.encode()):
            return jsonify({"error": "invalid_signature", "message": "bad signature"}), 401
        payload = json.loads(body)
        conn = connection()
        claim = {"source": source, "event_id": key, "payload": body.decode()}
        with conn, conn.cursor() as cur:
            cur.execute(KEY_CLAIM_SQL, claim)
            row = cur.fetchone()
            if row is None:
                cur.execute(KEY_READ_SQL, claim)
                status, result, headers = cur.fetchone()
                response = jsonify(result)
                response.status_code = status
                response.headers.extend([tuple(h) for h in headers])
                response.headers["Idempotent-Replayed"] = "true"
                return response
            account = int(payload["account"])
            cur.execute(UPDATE_SQL, {"event_id": key, "account": account})
            result = {"account": account}
            headers = [["Location", f"/v1/bench/{key}"]]
            cur.execute(
                KEY_STORE_SQL,
                {"id": row[0], "result": json.dumps(result), "headers": json.dumps(headers)},
            )
        response = jsonify(result)
        response.status_code = 201
        response.headers.extend([tuple(h) for h in headers])
        return response

    return app
