#!/usr/bin/env bash
# `make run`: migrate the demo database, print a signed test event, serve on 127.0.0.1:$PORT,
# with `idemhook worker` and a mail sink (127.0.0.1:$EMAIL_SMTP_PORT) for the email API example.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${PORT:-8000}"
# The email API example's SMTP server: a local sink that prints what it receives. Beside the
# web port by default, so that two demos on two ports never share one sink.
export EMAIL_SMTP_PORT="${EMAIL_SMTP_PORT:-$((PORT + 25))}"
# Before anything is printed: a taken port would otherwise fail only after the curl is shown
# (`make run` checks before it installs anything, too).
python3 scripts/ports_free.py PORT "$PORT" EMAIL_SMTP_PORT "$EMAIL_SMTP_PORT" || exit 1
export IDEMHOOK_CONFIG="${IDEMHOOK_CONFIG:-webhooks.example.toml}"
# The demo's secret; a real deployment sets its own (see docs/configuration.md).
export DEMO_WEBHOOK_SECRET="${DEMO_WEBHOOK_SECRET:-demo-secret-not-for-production}"
export HUBSPOT_CLIENT_SECRET="${HUBSPOT_CLIENT_SECRET:-demo-hubspot-secret-not-for-production}"
export EMAIL_API_TOKEN="${EMAIL_API_TOKEN:-demo-email-token-not-for-production}"
# The dashboard's login (and the read API's bearer token); printed below when it is the demo's.
if [ -z "${IDEMHOOK_ADMIN_TOKEN:-}" ]; then
  export IDEMHOOK_ADMIN_TOKEN="demo-admin-token-not-for-production"
  token_note="log in with the demo's admin token: $IDEMHOOK_ADMIN_TOKEN"
else
  token_note="log in with your IDEMHOOK_ADMIN_TOKEN"
fi
if [ -z "${DATABASE_URL:-}" ]; then
  instance="${IDEMHOOK_INSTANCE_DIR:-$PWD/instance}"
  export DATABASE_URL="sqlite:///$instance/idemhook.db"
  echo "DATABASE_URL is not set: using the SQLite demo database $instance/idemhook.db"
fi

"$BIN/idemhook" db upgrade

event="$(mktemp)"
trap 'rm -f "$event"' EXIT
printf '{"id": "evt_demo_%s", "type": "contact.created", "email": "ada@example.com"}' \
  "$(date +%s%N)" > "$event"
echo
echo "Serving on http://127.0.0.1:$PORT. Send a signed test event (paste it twice: the"
echo "second answer is \"duplicate\" and the handler does not run again):"
echo
"$BIN/idemhook" sign demo "$event" --url "http://127.0.0.1:$PORT"
echo
echo "The example CRM plugin (docs/plugins.md) fills the contacts table from HubSpot events;"
echo "in another terminal, from this directory:"
echo
printf '  export IDEMHOOK_CONFIG=%q DATABASE_URL=%q DEMO_WEBHOOK_SECRET=%q HUBSPOT_CLIENT_SECRET=%q EMAIL_API_TOKEN=%q\n' \
  "$IDEMHOOK_CONFIG" "$DATABASE_URL" "$DEMO_WEBHOOK_SECRET" "$HUBSPOT_CLIENT_SECRET" "$EMAIL_API_TOKEN"
echo "  $BIN/idemhook send hubspot examples/crm/events/contact_creation.json --url http://127.0.0.1:$PORT"
echo
echo "The email-send API example (docs/outbox.md) sends one email per Idempotency-Key, however"
echo "often a client retries (every retry is answered 202 with the same id); \`idemhook worker\`"
echo "delivers it to the mail sink, which prints it here:"
echo
printf '  curl -X POST http://127.0.0.1:%s/v1/emails -H %q -H %q -H %q -d %q\n' "$PORT" \
  "Authorization: Bearer $EMAIL_API_TOKEN" "Idempotency-Key: demo-$(date +%s%N)" \
  "Content-Type: application/json" \
  '{"to": "ada@example.com", "subject": "Hello from idemhook", "text": "Sent once."}'
echo
echo "Then see it sent (queued, sent or failed; when; the SMTP server's answer), with ID the"
echo "answer's id:"
echo
printf '  curl http://127.0.0.1:%s/v1/emails/ID -H %q\n' "$PORT" \
  "Authorization: Bearer $EMAIL_API_TOKEN"
echo

echo "The dashboard: http://127.0.0.1:$PORT/dashboard ($token_note; docs/dashboard.md)"
echo

# The sink, the worker and the server run together; Ctrl-C (or SIGTERM) stops all three.
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if "$BIN/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', $EMAIL_SMTP_PORT))" \
  2>/dev/null; then
  "$BIN/python" -m aiosmtpd -n -l "127.0.0.1:$EMAIL_SMTP_PORT" -c aiosmtpd.handlers.Debugging &
  pids+=($!)
else
  echo "Port $EMAIL_SMTP_PORT is taken: no mail sink (set EMAIL_SMTP_PORT to another port);" \
    "the worker retries the emails until one answers" >&2
fi
"$BIN/idemhook" worker &
pids+=($!)
"$BIN/idemhook" serve --bind "127.0.0.1:$PORT" --access-logfile - &
pids+=($!)
wait -n "${pids[@]}"
