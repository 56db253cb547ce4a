#!/usr/bin/env bash
# Where a call's CPU goes, against the bar and the floor: nginx proxy_pass, the bare hyper
# proxy (examples/bare_proxy.rs) and credbroker (fsync=never) under the same load as
# benches/load.sh (wrk on CPU 0, servers on CPU 1), one after the other, each run once per
# round. For each it prints, per request: the proxy's user and system CPU µs (from
# /proc/PID/stat), its voluntary and involuntary context switches (all threads, from
# /proc/PID/task/*/status), and the upstream's user and system µs (it shares the core).
#
#   benches/split.sh [-c CONNS=32] [-d SECONDS=5] [-r ROUNDS=2] [BIN=target/release/credbroker]
#
# Loopback addresses only; every run bounded in time. Installs wrk and nginx with apt when
# missing; builds the release binary and the example when missing.
set -euo pipefail
CONNS=32 DURATION=5 ROUNDS=2
while getopts "c:d:r:" o; do
  case $o in
    c) CONNS=$OPTARG ;; d) DURATION=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    *) sed -n 2,12p "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/credbroker}")
source benches/common.sh
need_wrk_and_nginx
[ -x "$BIN" ] || cargo build --release
BARE=target/release/examples/bare_proxy
[ -x "$BARE" ] || cargo build --release --example bare_proxy

WORK=$(mktemp -d)
UP=127.0.0.1:18191 NGX=127.0.0.1:18192 CB=127.0.0.1:18193 BARE_AT=127.0.0.1:18194
CREDENTIAL=split-bench-credential
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for d in up px; do
    [ -f "$WORK/$d/nginx.pid" ] && kill "$(cat "$WORK/$d/nginx.pid")" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
upstream_and_nginx_proxy "$WORK" "$UP" "$NGX" "$CREDENTIAL"
secret=split-client-secret
broker_conf "$WORK/cb/credbroker.toml" "$CB" never "$UP" "$CREDENTIAL" "$secret"
RUST_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/cb/credbroker.toml" 2>"$WORK/cb.log" &
PIDS+=($!); PID_CB=$!
taskset -c 1 "$BARE" "$BARE_AT" "$UP" "$CREDENTIAL" 2>"$WORK/bare.log" & PIDS+=($!); PID_BARE=$!
for a in $UP $NGX $CB $BARE_AT; do wait_http "$a"; done
TOKEN=$(broker_token "$CB" "$secret")
sleep 0.3
worker_of() { pgrep -P "$(cat "$WORK/$1/nginx.pid")" | head -1; }
UP_WORKER=$(worker_of up) PX_WORKER=$(worker_of px)

snapshot() { # pid -> "utime stime voluntary involuntary" (ticks, ticks, all threads)
  local u s v=0 i=0 t
  read -r u s < <(awk '{print $14, $15}' "/proc/$1/stat")
  for t in /proc/"$1"/task/*; do
    v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t/status")))
    i=$((i + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")))
  done
  echo "$u $s $v $i"
}

run() { # name pid url
  local before up_before after up_after out total
  before=$(snapshot "$2") up_before=$(snapshot "$UP_WORKER")
  out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Authorization: Bearer $TOKEN" "$3")
  after=$(snapshot "$2") up_after=$(snapshot "$UP_WORKER")
  total=$(echo "$out" | grep -oE '[0-9]+ requests in' | cut -d' ' -f1)
  python3 - "$1" "$total" "$DURATION" "$(getconf CLK_TCK)" $before $after $up_before $up_after <<'PY'
import sys
name, n, secs, tick = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
v = list(map(int, sys.argv[5:]))
d = [a - b for a, b in zip(v[4:8], v[0:4])]
u = [a - b for a, b in zip(v[12:16], v[8:12])]
us = lambda ticks: ticks / tick * 1e6 / max(n, 1)
print(f"{name:<11} {n / secs:>9.0f} req/s  user {us(d[0]):5.2f}  sys {us(d[1]):5.2f} µs/req  "
      f"switches vol {d[2] / max(n, 1):4.2f} invol {d[3] / max(n, 1):4.2f} /req  "
      f"| upstream user {us(u[0]):5.2f} sys {us(u[1]):5.2f}")
PY
}

echo "$CONNS connections, ${DURATION}s per run, $ROUNDS rounds; credbroker: $BIN" >&2
for _ in $(seq "$ROUNDS"); do
  run "nginx" "$PX_WORKER" "http://$NGX/repos/acme/widget/issues"
  run "bare hyper" "$PID_BARE" "http://$BARE_AT/repos/acme/widget/issues"
  run "credbroker" "$PID_CB" "http://$CB/github/repos/acme/widget/issues"
done
