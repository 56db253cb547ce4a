#!/usr/bin/env bash
# A/B comparison of two credbroker binaries under the load of benches/load.sh: one broker at a
# time in front of the same fast loopback upstream (nginx), wrk pinned to CPU 0, broker and
# upstream to CPU 1, the two binaries run alternately. For measuring one change: build the
# binary before and after it, then
#
#   benches/ab.sh [-f never|always] [-c CONNS=32] [-d SECONDS=5] [-r ROUNDS=3] [-s] BIN_A BIN_B
#
# With -s, B runs with `[state] backend = "redis"` (a redis-server on loopback, pinned to CPU 1
# with the servers): `benches/ab.sh -s BIN BIN` is the cost of the shared state (DESIGN §7).
# Prints calls/s and the broker's CPU µs per call for every run, then the medians and the
# ratio B/A. Only loopback addresses are used; every run is bounded in time.
set -euo pipefail
FSYNC=never CONNS=32 DURATION=5 ROUNDS=3 SHARED=
while getopts "f:c:d:r:s" o; do
  case $o in
    f) FSYNC=$OPTARG ;; c) CONNS=$OPTARG ;; d) DURATION=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    s) SHARED=1 ;;
    *) sed -n 2,10p "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n 2,10p "$0"; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
cd "$(dirname "$0")/.."
source benches/common.sh
need_wrk_and_nginx

WORK=$(mktemp -d)
UP=127.0.0.1:18091 CB=127.0.0.1:18093 CREDENTIAL=ab-bench-credential
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
nginx_conf "$WORK" "$(upstream_server "$UP" "$CREDENTIAL")"
taskset -c 1 nginx -c "$WORK/nginx.conf" -p "$WORK"
secret=ab-client-secret
broker_conf "$WORK/credbroker.toml" "$CB" "$FSYNC" "$UP" "$CREDENTIAL" "$secret"
CONFIG_B=$WORK/credbroker.toml
if [ -n "$SHARED" ]; then
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  taskset -c 1 redis-server --bind 127.0.0.1 --port 18379 --save "" --appendonly no \
    --loglevel warning --daemonize yes --pidfile "$WORK/redis.pid"
  CONFIG_B=$WORK/credbroker-b.toml
  { cat "$WORK/credbroker.toml"
    printf '\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:18379/0"\n'; } > "$CONFIG_B"
fi

run() { # binary config -> "calls/s cpu_us_per_call"
  rm -f "$WORK/audit.jsonl"
  RUST_LOG=warn taskset -c 1 "$1" serve --config "$2" 2>"$WORK/broker.log" &
  local pid=$!
  wait_http "$CB"
  local token
  token=$(broker_token "$CB" "$secret")
  local before after out
  before=$(awk '{print $14+$15}' "/proc/$pid/stat")
  out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Authorization: Bearer $token" \
    "http://$CB/github/repos/acme/widget/issues")
  after=$(awk '{print $14+$15}' "/proc/$pid/stat")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local rps total
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  total=$(echo "$out" | grep -oE '[0-9]+ requests in' | cut -d' ' -f1)
  echo "$rps $(python3 -c "print(round(($after-$before)/$(getconf CLK_TCK)*1e6/max($total,1),2))")"
}

echo "fsync=$FSYNC, $CONNS connections, ${DURATION}s per run, $ROUNDS rounds, A and B alternately${SHARED:+, B with Redis state}" >&2
: > "$WORK/results"
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=$A config=$WORK/credbroker.toml
    [ $side = B ] && bin=$B config=$CONFIG_B
    line=$(run "$bin" "$config")
    echo "$side $line" | tee -a "$WORK/results" >&2
  done
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {s: [statistics.median(float(r[i]) for r in rows if r[0] == s) for i in (1, 2)] for s in "AB"}
for s in "AB":
    print(f"{s}: {med[s][0]:.0f} calls/s, {med[s][1]:.2f} CPU µs per call (medians)")
print(f"B/A: calls/s {med['B'][0] / med['A'][0]:.3f}x, CPU per call {med['B'][1] / med['A'][1]:.3f}x")
PY
