"""Health, readiness, metrics and per-event logs, as an operator sees them."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from idemhook import create_app
from idemhook._engine import logs
from idemhook._engine.logs import TEXT_FORMAT, TextFormatter
from idemhook._store import migrate
from idemhook._values.errors import ConfigError
from idemhook._web import metrics
from idemhook.testing import deliver, postgres
from tests.conftest import SECRET
from tests.reliability.conftest import WHOAMI_SOURCES, signed_post
from tests.servers import gunicorn, pin_sessions
from tests.test_api import AUTH, TOKEN
from tests.test_events_cli import closed_port


def samples(text: str, name: str) -> dict[tuple, float]:
    """Samples of metric ``name`` keyed by their sorted label items."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text, name).get(tuple(sorted(labels.items())), 0.0)


# -- health ----------------------------------------------------------------------------------


def test_healthz_and_readyz_when_all_is_well(client):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["revision"] == sorted(migrate.heads(client.application))


def test_readyz_fails_when_the_database_is_down(db_url):
    app = create_app(
        {"DATABASE_URL": db_url.set(host="127.0.0.1", port=closed_port()), "IDEMHOOK_CONFIG": {}}
    )
    client = app.test_client()
    assert client.get("/healthz").status_code == 200  # the process is up
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["database"] == "unreachable"


def test_readyz_fails_while_migrations_are_behind(pg_server):
    url = postgres.create_database(pg_server)
    try:
        app = create_app({"DATABASE_URL": url, "IDEMHOOK_CONFIG": {}})
        migrate.upgrade(app, "0001")
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503
        assert ready.json["database"] == "migrations behind"
        assert ready.json["applied"] == ["0001"]
        assert ready.json["expected"] == sorted(migrate.heads(app)) != ["0001"]
        migrate.upgrade(app)
        assert app.test_client().get("/readyz").json["database"] == "ok"
        # A newer release migrated further (rolling deploy): this code is still ready.
        with app.extensions["idemhook.db"].engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
        ahead = app.test_client().get("/readyz")
        assert ahead.status_code == 200 and ahead.json["database"] == "ahead"
        with app.extensions["idemhook.db"].engine.begin() as conn:
            conn.execute(
                text("UPDATE alembic_version SET version_num = :v"), {"v": max(migrate.heads(app))}
            )
        migrate.downgrade(app, "0001")  # the downgrades work too
        assert migrate.current(app) == {"0001"}
        assert app.test_client().get("/readyz").status_code == 503
        app.extensions["idemhook.db"].engine.dispose()
    finally:
        postgres.drop_database(url)


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_count_events_by_outcome_and_time_claims_and_handlers(client, sql):
    before = client.get("/metrics").get_data(as_text=True)
    deliver(client, "acme", {"id": "m1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "m1", "type": "contact.updated"})
    deliver(client, "acme", {"id": "m2", "type": "invoice.paid"})
    sql("INSERT INTO test_failures VALUES ('m3', 'down')")
    deliver(client, "acme", {"id": "m3", "type": "contact.updated"})
    client.post("/webhooks/acme", data=b"{}", headers={"Content-Type": "application/json"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    after = response.get_data(as_text=True)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    events = "idemhook_events_total"
    assert moved(events, source="acme", type="contact.updated", outcome="processed") == 1
    assert moved(events, source="acme", type="contact.updated", outcome="duplicate") == 1
    assert moved(events, source="acme", type="invoice.paid", outcome="ignored") == 1
    assert moved(events, source="acme", type="contact.updated", outcome="failed") == 1
    # Handlers ran for m1 and m3; every delivery that reached the claim was timed.
    assert moved("idemhook_handler_duration_seconds_count", source="acme") == 2
    assert moved("idemhook_claim_wait_seconds_count", source="acme") == 4
    requests_ = "idemhook_request_duration_seconds_count"
    assert moved(requests_, endpoint="intake.receive", status="200") == 3
    assert moved(requests_, endpoint="intake.receive", status="500") == 1
    assert moved(requests_, endpoint="intake.receive", status="401") == 1


def test_event_type_labels_are_bounded_per_source(client):
    client.application.extensions["idemhook.metrics"].max_types = 2
    for i in range(5):
        deliver(client, "acme", {"id": f"t{i}", "type": f"kind.{i}"})
    text = client.get("/metrics").get_data(as_text=True)
    types = {dict(k)["type"] for k in samples(text, "idemhook_events_total")}
    assert types == {"kind.0", "kind.1", "other"}
    assert value(text, "idemhook_events_total", source="acme", type="other", outcome="ignored") == 3


def test_metrics_can_require_the_admin_token(make_app):
    client = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN, IDEMHOOK_METRICS_PUBLIC=False).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 200
    public = make_app(IDEMHOOK_ADMIN_TOKEN=TOKEN).test_client()
    assert public.get("/metrics").status_code == 200


def test_metrics_public_setting_is_read_from_the_environment(monkeypatch, db_url):
    monkeypatch.setenv("IDEMHOOK_METRICS_PUBLIC", "false")
    app = create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": {}})
    assert app.config["IDEMHOOK_METRICS_PUBLIC"] is False
    monkeypatch.setenv("IDEMHOOK_METRICS_PUBLIC", "maybe")
    with pytest.raises(ConfigError, match="IDEMHOOK_METRICS_PUBLIC"):
        create_app({"DATABASE_URL": db_url, "IDEMHOOK_CONFIG": {}})


@pytest.mark.gunicorn
def test_metrics_add_up_and_events_are_logged_across_gunicorn_workers(pg_url, tmp_path):
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "IDEMHOOK_LOG_FORMAT": "json"}
    run = uuid.uuid4().hex[:8]
    sent: list[str] = []
    with gunicorn(WHOAMI_SOURCES, pg_url, env=env) as server:

        def ask(session: requests.Session) -> int:
            sent.append(f"{run}-{len(sent)}")
            answer = signed_post(server.url, "whoami", {"id": sent[-1]}, session=session)
            assert answer.status_code == 200 and answer.json()["status"] == "processed"
            return answer.json()["result"]["worker"]

        # Deliveries until every worker has answered one: the counts live in every process.
        pinned = pin_sessions(server, 1, ask)
        try:
            for worker, [session] in pinned.items():
                # Each worker, scraped on a connection it holds, reports every worker's count.
                text = session.get(f"{server.url}/metrics", timeout=5).text
                counted = value(
                    text, "idemhook_events_total", source="whoami", type="", outcome="processed"
                )
                assert counted == len(sent), (worker, counted, len(sent))
        finally:
            for [session] in pinned.values():
                session.close()
        assert len(pinned) == server.workers >= 2
        log = server.log()
    # Under gunicorn too, each event is one JSON line on stderr, from every worker.
    lines = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"idemhook.events"' in line
    ]
    assert sorted(line["event_id"] for line in lines) == sorted(sent)
    assert {line["outcome"] for line in lines} == {"processed"}


# -- logs ------------------------------------------------------------------------------------


def _lines(caplog, app) -> list[str]:
    handler = next(
        h for h in logging.getLogger("idemhook").handlers if isinstance(h, logs._Handler)
    )
    return [handler.format(r) for r in caplog.records if r.name == "idemhook.events"]


def test_one_json_line_per_event_without_payload_or_signature(make_app, caplog):
    app = make_app(IDEMHOOK_LOG_FORMAT="json")
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="idemhook")
    secret_value = "card-4242-4242"
    response = deliver(client, "acme", {"id": "l1", "type": "contact.updated", "pan": secret_value})
    deliver(client, "acme", {"id": "l1", "type": "contact.updated", "pan": secret_value})
    [first, second] = _lines(caplog, app)
    record = json.loads(first)
    assert {k: record[k] for k in ("source", "event_id", "event_type", "outcome")} == {
        "source": "acme",
        "event_id": "l1",
        "event_type": "contact.updated",
        "outcome": "processed",
    }
    assert isinstance(record["duration_ms"], float) and record["level"] == "info"
    assert json.loads(second)["outcome"] == "duplicate"
    signature = next(v for k, v in response.request.headers.items() if "ignature" in k)
    for line in (first, second):
        assert secret_value not in line and SECRET not in line and signature not in line


def test_text_lines_cannot_be_split_by_a_hostile_event_id(make_app, caplog):
    app = make_app(IDEMHOOK_LOG_FORMAT="text")
    caplog.set_level(logging.INFO, logger="idemhook")
    deliver(app.test_client(), "acme", {"id": "x\nFAKE outcome=processed", "type": "a b"})
    [line] = _lines(caplog, app)
    assert "\n" not in line
    assert 'event_id="x\\nFAKE outcome=processed"' in line and "outcome=ignored" in line


def test_unknown_log_format_is_refused(make_app):
    with pytest.raises(ConfigError, match="IDEMHOOK_LOG_FORMAT"):
        make_app(IDEMHOOK_LOG_FORMAT="xml")


def test_a_failed_events_log_line_names_the_handler_and_exception_class_only(
    make_app, sql, caplog
):
    # The on-call engineer's first question; the exception's message stays out (it may
    # quote the payload: here it does).
    sql("INSERT INTO test_failures (event_id, reason) VALUES ('lf1', 'card 4242 declined')")
    app = make_app()
    with caplog.at_level("INFO", logger="idemhook.events"):
        answer = deliver(app.test_client(), "acme", {"id": "lf1", "type": "contact.new"})
    assert answer.status_code == 500
    [line] = [r.getMessage() for r in caplog.records if r.name == "idemhook.events"]
    assert "outcome=failed" in line
    assert "handler=tests.plugins.recorder:record" in line and "error=RuntimeError" in line
    assert "4242" not in line and "declined" not in line


@given(
    st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
    st.floats(min_value=0, max_value=2.5),
)
def test_text_lines_carry_the_timestamp_logging_itself_would_write(created, later):
    # TextFormatter works the timestamp's text out once per second; each line's must still
    # be the one logging.Formatter writes for its instant, milliseconds included, also for
    # a line in the same second as the previous one or in a later one.
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for at in (created, created + later):
        record = logging.LogRecord("idemhook.events", logging.INFO, __file__, 1, "m", (), None)
        record.created, record.msecs = at, (at - int(at)) * 1000
        assert ours.format(record) == standard.format(record)


@given(value=st.one_of(st.none(), st.text(), st.integers(), st.floats()))
def test_a_field_is_written_bare_only_when_it_cannot_forge_or_split_a_line(value):
    """The text line's rule: printable ASCII but space, '"' and '=' is written bare;
    anything else (empty, a space, a quote, an equals sign, a newline, non-ASCII) is
    quoted as a JSON string, so a sender's ID can neither add a field nor a line."""
    import re

    text = "-" if value is None else str(value)
    written = logs._text(value)
    if re.fullmatch(r"[!#-<>-~]+", text):
        assert written == text
    else:
        assert written == json.dumps(text)
        assert "\n" not in written and json.loads(written) == text


@given(
    amounts=st.lists(st.one_of(st.floats(), st.sampled_from(metrics._BUCKETS)), max_size=30),
    counts=st.lists(st.integers(0, 5), max_size=5),
)
def test_the_quick_observe_and_inc_count_as_prometheus_clients_own(amounts, counts):
    """metrics.observer and metrics.incrementer (the paths every request takes) leave every
    bucket, sum, count and total as the library's ``observe`` and ``inc`` do, for any
    amount (negative, infinite, NaN), and are really the quick ones."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    seen = []
    for quick in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ["s"], buckets=metrics._BUCKETS, registry=registry)
        counter = Counter("c", "c", ["s"], registry=registry)
        child, counted = histogram.labels("x"), counter.labels("x")
        observe = metrics.observer(child) if quick else child.observe
        inc = metrics.incrementer(counted) if quick else counted.inc
        if quick:  # not the library's own methods handed back
            assert getattr(observe, "__self__", None) is None
            assert getattr(inc, "__self__", None) is not counted
        for amount in amounts:
            observe(amount)
        for count in counts:
            inc(count)
        seen.append(
            [
                (sample.name, sample.labels, repr(sample.value))  # repr: NaN equals NaN
                for metric in registry.collect()
                for sample in metric.samples
                if not sample.name.endswith("_created")
            ]
        )
    assert seen[0] == seen[1]


# -- the event line written without a LogRecord (logs._only_ours) -------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
@given(
    event_id=st.text(max_size=40),
    event_type=st.one_of(st.none(), st.text(max_size=20)),
    seconds=st.floats(min_value=0, max_value=100, allow_nan=False),
    created=st.floats(min_value=1.6e9, max_value=2e9, allow_nan=False),
)
def test_an_event_line_written_directly_is_the_one_the_handler_writes(
    fmt, event_id, event_type, seconds, created
):
    """When idemhook's handler is the only one listening, the line is written without the
    logging module's dispatch: byte for byte what its formatter makes of the record."""
    import io
    import time as time_module

    handler = logs._Handler(io.StringIO())
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else TextFormatter())
    parent = logging.getLogger("idemhook")
    saved = (parent.handlers, logging.root.handlers, time_module.time, parent.level)
    fields = {
        "source": "acme",
        "event_id": event_id,
        "event_type": event_type,
        "outcome": "processed",
        "duration_ms": round(seconds * 1000, 2),
        "handler": "plugin.count",
    }
    written = []
    records: list[logging.LogRecord] = []
    make_record = logs.log.makeRecord
    try:
        parent.handlers, logging.root.handlers = [handler], []
        parent.setLevel(logging.INFO)
        time_module.time = lambda: created
        logs.log.makeRecord = lambda *a, **k: records.append(make_record(*a, **k)) or records[-1]
        assert logs._only_ours(logs.log, logging.INFO) is handler  # the direct way
        logs.log_fields(logs.log, logging.INFO, fields)
        assert records == []  # written without a record
        written.append(handler.stream.getvalue())
        handler.stream.seek(0), handler.stream.truncate()
        logs.log.addFilter(lambda record: True)  # a filter: the logging module's way
        try:
            assert logs._only_ours(logs.log, logging.INFO) is None
            logs.log_fields(logs.log, logging.INFO, fields)
        finally:
            logs.log.filters.clear()
        assert len(records) == 1
        written.append(handler.stream.getvalue())
    finally:
        parent.handlers, logging.root.handlers, time_module.time, level = saved
        parent.setLevel(level)
        del logs.log.makeRecord  # the class's own again
    direct, through_logging = written
    assert direct == through_logging and direct.count("\n") == 1


def test_another_handler_sees_every_event_line(make_app, caplog):
    """A handler on the root logger (pytest's here, ``logging.basicConfig`` in an app) or
    on the idemhook loggers gets each event's record, fields included."""
    app = make_app()
    caplog.set_level(logging.INFO, logger="idemhook")
    assert logs._only_ours(logs.log, logging.INFO) is None
    deliver(app.test_client(), "acme", {"id": "seen-1", "type": "contact.updated"})
    [record] = [r for r in caplog.records if r.name == "idemhook.events"]
    assert record.event_id == "seen-1" and record.outcome == "processed"
