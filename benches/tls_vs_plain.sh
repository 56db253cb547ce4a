#!/usr/bin/env bash
# Requests/s and p99 through the proxy over TLS 1.3 with keep-alive versus plain HTTP, in one
# run (issue 4's closing note). Starts `target/release/credbroker serve` twice — once plain,
# once with TLS — in front of one nginx upstream on loopback, and drives each with wrk for
# DURATION (10 s by default). Needs: a release build (`cargo build --release`), wrk, nginx,
# curl. Everything lives in a temp folder that is removed at exit.
#
#   benches/tls_vs_plain.sh            # defaults: 10s, 1 wrk thread, 32 connections
#   DURATION=5s CONNECTIONS=64 benches/tls_vs_plain.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/credbroker}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
PLAIN_PORT=${PLAIN_PORT:-18080}
TLS_PORT=${TLS_PORT:-18443}
UPSTREAM_PORT=${UPSTREAM_PORT:-18090}

for tool in wrk nginx curl sha256sum; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release" >&2; exit 2; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# The upstream: nginx answering a small JSON body from memory, keep-alive, no logs.
cat >"$TMP/nginx.conf" <<EOF
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $TMP; proxy_temp_path $TMP; fastcgi_temp_path $TMP;
    uwsgi_temp_path $TMP; scgi_temp_path $TMP;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { default_type application/json; return 200 '{"ok":true}'; }
    }
}
EOF
nginx -p "$TMP" -c "$TMP/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

"$BIN" keygen dev-certs --out "$TMP/certs" >/dev/null
SECRET=bench-secret-$RANDOM$RANDOM
SECRET_SHA=$(printf %s "$SECRET" | sha256sum | cut -d' ' -f1)

# config NAME PORT [TLS lines]: one broker config, its own audit log (fsync never).
config() {
    cat >"$TMP/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
$3

[audit]
path = "$1-audit.jsonl"
fsync = "never"

[[connectors]]
name = "bench"
owner = "bench@example.test"
purpose = "load test"
expires = "2099-12-31"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
credential = "literal:bench-upstream-credential"

  [[connectors.operations]]
  name = "get"
  method = "GET"
  path = "/items/{id}"

[[clients]]
id = "bench"
owner = "bench@example.test"
secret_sha256 = "$SECRET_SHA"
grants = [ { connector = "bench", operations = ["get"], max_ttl = "900s" } ]
EOF
}
config plain "$PLAIN_PORT" ""
config tls "$TLS_PORT" "tls_cert = \"certs/server.pem\"
tls_key = \"certs/server-key.pem\""

# wait_up URL [curl args]: until the listener answers (at most ~10 s).
wait_up() {
    for _ in $(seq 100); do
        curl -s -o /dev/null "${@:2}" "$1" && return 0
        sleep 0.1
    done
    echo "not up: $1" >&2
    exit 1
}

# run NAME BASE_URL [curl args]: start the broker, get a token, drive it with wrk.
run() {
    local name=$1 base=$2
    shift 2
    RUST_LOG=warn "$BIN" serve --config "$TMP/$name.toml" 2>"$TMP/$name.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_up "$base/.well-known/jwks.json" "$@"
    local token
    token=$(curl -s "$@" -u "bench:$SECRET" -d grant_type=client_credentials \
        -d scope=bench:get -d ttl=900 "$base/oauth2/token" |
        sed -E 's/.*"access_token":"([^"]+)".*/\1/')
    local check
    check=$(curl -s -o /dev/null -w '%{http_code}' "$@" -H "Authorization: Bearer $token" \
        "$base/bench/items/42")
    [ "$check" = 200 ] || { echo "$name: proxied call answered $check" >&2; exit 1; }
    # The negotiated protocol, as OpenSSL (which wrk uses too) picks it.
    curl -sv -o /dev/null "$@" "$base/.well-known/jwks.json" 2>&1 |
        grep -o 'SSL connection using [^ ]*' >"$TMP/$name.proto" || echo "no TLS" >"$TMP/$name.proto"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        -H "Authorization: Bearer $token" "$base/bench/items/42" >"$TMP/$name.wrk"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

run plain "http://127.0.0.1:$PLAIN_PORT"
run tls "https://127.0.0.1:$TLS_PORT" --cacert "$TMP/certs/ca.pem"

rps() { awk '/^Requests\/sec/ {print $2}' "$TMP/$1.wrk"; }
p99() { awk '$1 == "99%" {print $2}' "$TMP/$1.wrk"; }
errors() { awk '/Non-2xx|Socket errors/ {print}' "$TMP/$1.wrk"; }

echo "credbroker proxy, $DURATION per run, wrk -t$THREADS -c$CONNECTIONS, keep-alive, fsync=never, nginx upstream"
printf '%-14s %12s %10s\n' "" "requests/s" "p99"
printf '%-14s %12s %10s\n' "plain HTTP" "$(rps plain)" "$(p99 plain)"
printf '%-14s %12s %10s   (%s)\n' "TLS" "$(rps tls)" "$(p99 tls)" "$(cat "$TMP/tls.proto")"
awk -v p="$(rps plain)" -v t="$(rps tls)" 'BEGIN { printf "TLS/plain throughput ratio: %.2f\n", t / p }'
for name in plain tls; do
    e=$(errors "$name")
    [ -z "$e" ] || echo "$name: $e"
done
[ "${VERBOSE:-0}" = 1 ] && cat "$TMP/plain.wrk" "$TMP/tls.wrk"
exit 0
