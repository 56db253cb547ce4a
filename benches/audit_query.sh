#!/usr/bin/env bash
# Times `audit verify`, `audit query` and `audit report` on a generated 1,000,000-record log.
# usage: benches/audit_query.sh [RECORDS]   (builds the release binary if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
BIN=target/release/credbroker
[ -x "$BIN" ] || cargo build --release
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
python3 - "$N" "$DIR/audit.jsonl" <<'PY'
import hashlib, json, sys
n, path = int(sys.argv[1]), sys.argv[2]
prev = "0" * 64
clients = ["triage-bot", "sync-job", "ir-bot", "deploy-bot"]
with open(path, "w") as f:
    for seq in range(1, n + 1):
        deny = seq % 17 == 0
        rec = {"seq": seq, "ts": "2026-11-%02dT%02d:%02d:%02d.%06dZ" % (1 + seq // 86400 % 28, seq // 3600 % 24, seq // 60 % 60, seq % 60, seq % 1000000),
               "event": "proxy", "request_id": "%032x" % seq, "client": clients[seq % 4], "connector": "github",
               "operation": "issues.read", "method": "GET", "path": "/repos/acme/widget/issues", "jti": "j%d" % (seq // 10),
               "peer": "127.0.0.1:5000", "decision": "deny" if deny else "allow"}
        if deny:
            rec["reason"] = "not_granted"; rec["status"] = 403
        rec["prev"] = prev
        b = json.dumps(rec, separators=(",", ":"))
        h = hashlib.sha256(b.encode()).hexdigest()
        f.write(b[:-1] + ',"hash":"' + h + '"}\n')
        prev = h
PY
ls -la "$DIR/audit.jsonl"
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); printf "%6.3f s  %s\n" "$(echo "$e - $s" | bc)" "$*" | sed "s|$DIR/||g"; }
t "$BIN" audit verify "$DIR/audit.jsonl"
t "$BIN" audit query "$DIR/audit.jsonl" --client ir-bot --decision deny
t "$BIN" audit query "$DIR/audit.jsonl" --client ir-bot --decision deny --json
t "$BIN" audit query "$DIR/audit.jsonl" --since 2026-11-20T00:00:00Z
t "$BIN" audit report "$DIR/audit.jsonl"
