"""``idemhook secrets``: values in through the environment or stdin only, never out.

The secret is looked for (grepped) in every output: the commands', the server's log,
the read API's, ``idemhook sources``'; the stored row holds a Fernet token, which a
changed ``IDEMHOOK_SECRETS_KEY`` list still opens, and ``secrets rekey`` moves to the
first key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet, InvalidToken

from tests.servers import gunicorn, toml
from tests.test_cli import run
from tests.test_tenants import ALICE_SECRET, KEY, TENANTS, add_secret, event, http_post, sign

ADMIN = "admin-token-for-the-read-api"
ROOT = Path(__file__).resolve().parent.parent


def stored(sql, secret_id: int) -> bytes:
    return bytes(sql("SELECT secret FROM source_secrets WHERE id = :id", id=secret_id)[0][0])


def test_a_secret_appears_in_no_output_and_no_log(make_app, pg_url, sql):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY, IDEMHOOK_ADMIN_TOKEN=ADMIN)
    runner = app.test_cli_runner()
    outputs = []
    added = runner.invoke(
        args=["secrets", "add", "shop", "alice", "--stdin", "--expires", "7d"],
        input=ALICE_SECRET + "\n",
    )
    assert added.exit_code == 0, added.output
    secret_id = int(added.output.strip())  # the id, and nothing else
    outputs.append(added.output)
    env = {"IDEMHOOK_SECRETS_KEY": KEY, "IDEMHOOK_ADMIN_TOKEN": ADMIN}
    with gunicorn(TENANTS, pg_url, env=env) as server:
        url = f"{server.url}/webhooks/shop/alice"
        assert http_post(requests, url, ALICE_SECRET, event("evt_1")).status_code == 200
        refused = http_post(requests, url, ALICE_SECRET + "x", event("evt_2"))
        assert refused.status_code == 401
        outputs.append(refused.text)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        events = requests.get(f"{server.url}/events?source=shop", headers=auth, timeout=30)
        assert events.status_code == 200 and "alice:evt_1" in events.text
        outputs.append(events.text)
        log = server.log()
    assert "alice:evt_1" in log  # the log is the server's, with the delivery in it
    outputs.append(log)
    for args in (
        ["secrets", "list", "shop"],
        ["secrets", "list", "shop", "alice", "--json"],
        ["secrets", "expire", "shop", "alice", str(secret_id), "--in", "24h"],
        ["sources"],
        ["events", "list", "--source", "shop"],
    ):
        result = runner.invoke(args=args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    listed = outputs[-5]
    assert str(secret_id) in listed and "alice" in listed
    assert "yes: https://<your-host>/webhooks/shop/<tenant>; 1 tenant(s)" in outputs[-2]
    for output in outputs:
        assert ALICE_SECRET not in output
    assert ALICE_SECRET.encode() not in stored(sql, secret_id)


def test_the_row_holds_a_token_that_a_changed_key_list_still_opens(make_app, sql):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)
    secret_id = add_secret(app.test_cli_runner(), "shop", "alice", ALICE_SECRET)
    token = stored(sql, secret_id)
    assert token != ALICE_SECRET.encode() and ALICE_SECRET.encode() not in token
    assert Fernet(KEY.encode()).decrypt(token) == ALICE_SECRET.encode()

    # A new key put first, the old one kept after it: old rows still verify deliveries.
    new_key = Fernet.generate_key().decode()
    rotated = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=f"{new_key}, {KEY}")
    body = event("evt_1")
    answer = rotated.test_client().post(
        "/webhooks/shop/alice", data=body, headers=sign(ALICE_SECRET, body)
    )
    assert answer.status_code == 200, answer.json

    # rekey: every row re-encrypted with the first key; the old key alone opens none.
    result = rotated.test_cli_runner().invoke(args=["secrets", "rekey"])
    assert result.exit_code == 0, result.output
    assert "re-encrypted 1 secret(s)" in result.output
    token = stored(sql, secret_id)
    assert Fernet(new_key.encode()).decrypt(token) == ALICE_SECRET.encode()
    with pytest.raises(InvalidToken):
        Fernet(KEY.encode()).decrypt(token)
    only_new = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=new_key)
    body = event("evt_2")
    answer = only_new.test_client().post(
        "/webhooks/shop/alice", data=body, headers=sign(ALICE_SECRET, body)
    )
    assert answer.status_code == 200, answer.json


def test_add_expires_and_refuses_what_cannot_be_a_secret(make_app, sql, monkeypatch):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)
    runner = app.test_cli_runner()
    before = datetime.now(UTC)
    secret_id = add_secret(runner, "shop", "alice", ALICE_SECRET, "--expires", "7d")
    (expires,) = sql("SELECT expires_at FROM source_secrets WHERE id = :id", id=secret_id)[0]
    assert before + timedelta(days=7) <= expires <= datetime.now(UTC) + timedelta(days=7)

    def add(*args: str, env: dict | None = None, stdin: str | None = None):
        return runner.invoke(args=["secrets", "add", *args], env=env or {}, input=stdin)

    cases = [
        (add("shop", "alice"), "exactly one of --from-env NAME and --stdin"),
        (add("shop", "alice", "--stdin", "--from-env", "X", stdin="s"), "exactly one of"),
        (add("shop", "alice", "--from-env", "UNSET_FOR_TEST"), "holds no secret"),
        (add("shop", "alice", "--stdin", stdin="   \n"), "holds no secret"),
        (add("nowhere", "alice", "--stdin", stdin="s"), "no source named 'nowhere'"),
        (add("shop", "a:b", "--stdin", stdin="s"), "a tenant's name is 1-64"),
    ]
    for result, says in cases:
        assert result.exit_code != 0
        assert says in result.output, result.output
    assert sql("SELECT count(*) FROM source_secrets") == [(1,)]


def test_list_expire_and_remove_need_only_the_database(make_app, sql):
    app = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY)
    runner = app.test_cli_runner()
    first = add_secret(runner, "shop", "alice", ALICE_SECRET)
    second = add_secret(runner, "shop", "bob", "bob-secret-0123456789")
    rows = [json.loads(line) for line in runner.invoke(
        args=["secrets", "list", "shop", "--json"]
    ).output.splitlines()]
    assert [(r["id"], r["tenant"], r["live"], r["count"]) for r in rows] == [
        (first, "alice", True, 0),
        (second, "bob", True, 0),
    ]
    assert set(rows[0]) == {"id", "tenant", "created", "expires", "live", "last_matched", "count"}
    wrong = runner.invoke(args=["secrets", "remove", "shop", "bob", str(first)])
    assert wrong.exit_code != 0 and "has no secret" in wrong.output
    assert runner.invoke(args=["secrets", "remove", "shop", "alice", str(first)]).exit_code == 0
    assert sql("SELECT id FROM source_secrets") == [(second,)]
    empty = runner.invoke(args=["secrets", "list", "shop", "alice"])
    assert "No secrets are stored for tenant 'alice' of source 'shop'." in empty.output


def test_start_up_and_sources_check_say_the_key_is_needed(tmp_path):
    (tmp_path / "webhooks.toml").write_text(toml(TENANTS))
    env = {"PYTHONPATH": str(ROOT)}
    done = run("sources", "check", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout
    assert "IDEMHOOK_SECRETS_KEY is not set, and source 'shop'" in done.stdout
    assert "2 source(s) with problems: shop, shop_async" in done.stderr
    # The server refuses to start the same way (any command that builds the whole app).
    refused = run("handlers", "list", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert "IDEMHOOK_SECRETS_KEY is not set" in refused.stderr
    ok = run("sources", "check", cwd=tmp_path, env={**env, "IDEMHOOK_SECRETS_KEY": KEY})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "tenants    yes: https://<your-host>/webhooks/shop/<tenant>" in ok.stdout
    assert KEY not in ok.stdout + ok.stderr + done.stdout + done.stderr


def test_a_row_no_key_opens_is_a_500_and_a_log_line_naming_the_setting(make_app, caplog):
    runner = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=KEY).test_cli_runner()
    add_secret(runner, "shop", "alice", ALICE_SECRET)
    other = make_app(TENANTS, IDEMHOOK_SECRETS_KEY=Fernet.generate_key().decode())
    body = event("evt_1")
    answer = other.test_client().post(
        "/webhooks/shop/alice", data=body, headers=sign(ALICE_SECRET, body)
    )
    assert (answer.status_code, answer.json["error"]) == (500, "internal_error")
    logged = [r.getMessage() for r in caplog.records if r.name == "idemhook.tenants"]
    assert len(logged) == 1 and "IDEMHOOK_SECRETS_KEY: none of its keys decrypts" in logged[0]
    assert KEY not in caplog.text and ALICE_SECRET not in caplog.text
