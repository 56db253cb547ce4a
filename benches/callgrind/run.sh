#!/usr/bin/env bash
# Instructions per proxied call under callgrind: repeatable to within ~1% for one binary, so two
# builds can be compared on this noisy machine where wall-clock runs (benches/ab.sh) swing by
# tens of percent. Instruction counts are not time (cache misses are not counted), and valgrind
# runs SHA-256 in software (~38.7k instructions a call for the two chain hashes; ~1.9k with the
# CPU's SHA extensions): compare builds, not figures across machines.
#
# usage: benches/callgrind/run.sh KIND BIN N [CONNS=4] [WARMUP_PER_CONN=100] [OUT=./target/callgrind/KIND-N]
#   KIND  credbroker | bare   (bare = examples/bare_proxy: LISTEN UPSTREAM CREDENTIAL)
#   BIN   the binary to profile (release build with symbols / line tables)
#   N     exact number of measured calls (spread evenly over CONNS keep-alive connections)
#
# What it does: starts a one-worker nginx upstream on 127.0.0.1:19181 (a small JSON body,
# only for the right credential, as benches/common.sh), starts BIN under
# `valgrind --tool=callgrind` pinned to CPU 1 (so credbroker starts one worker, as each worker
# runs under benches/load.sh), with the bench config (benches/common.sh's broker_conf shape,
# fsync = "never"), fetches a token from the broker's own token endpoint, then client.py opens
# CONNS keep-alive connections, makes WARMUP_PER_CONN calls on each, zeroes callgrind's
# counters (`callgrind_control -z`), makes exactly N calls, dumps (`callgrind_control -d`) and
# the broker is stopped. The dump therefore holds exactly N calls and no start-up/shutdown.
# Then analyse.py prints per-call totals, self/inclusive tables, cost by crate/source file and
# allocator calls; callgrind_annotate's own outputs are kept next to it.
#
# Needs: valgrind, nginx (apt-get install -y valgrind nginx-light), python3, curl.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../common.sh
source "$HERE/../common.sh"
KIND=${1:?KIND}; BIN=$(readlink -f "${2:?BIN}"); N=${3:?N}
CONNS=${4:-4}; WARM=${5:-100}; OUT=${6:-$HERE/../../target/callgrind/$KIND-$N}
UP=127.0.0.1:19181; PROXY=127.0.0.1:19183
CREDENTIAL=bench-credential-0123456789abcdef
SECRET=bench-client-secret
PATH_Q=/repos/acme/widget/issues

rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/cgrun.XXXXXX)
VGPID=""
cleanup() {
  [ -n "$VGPID" ] && kill "$VGPID" 2>/dev/null && wait "$VGPID" 2>/dev/null || true
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the upstream (the benches' own, on the other CPU) ---
nginx_conf "$WORK/up" "$(upstream_server "$UP" "$CREDENTIAL")"
taskset -c 0 nginx -c "$WORK/up/nginx.conf" -p "$WORK/up"

wait_up() { # ADDR SECONDS
  for _ in $(seq $(( $2 * 10 ))); do
    curl -s -o /dev/null "http://$1/" && return 0
    if [ -n "$VGPID" ] && ! kill -0 "$VGPID" 2>/dev/null; then echo "the proxy exited: see $OUT/proxy.log" >&2; return 1; fi
    sleep 0.1
  done
  echo "nothing answers at $1" >&2; return 1
}
wait_up "$UP" 5

# --- the proxy under callgrind ---
VG=(valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out.%p"
    --dump-instr=no --compress-strings=no --compress-pos=no --collect-atstart=yes)
case "$KIND" in
  credbroker)
    # The benches' broker config, fsync = "never".
    broker_conf "$WORK/credbroker.toml" "$PROXY" never "$UP" "$CREDENTIAL" "$SECRET"
    (cd "$WORK" && RUST_LOG=warn exec taskset -c 1 "${VG[@]}" "$BIN" serve --config "$WORK/credbroker.toml") \
      2>"$OUT/proxy.log" &
    VGPID=$!
    wait_up "$PROXY" 120
    TOKEN=$(curl -s -u "bench:$SECRET" -d grant_type=client_credentials -d scope=github:issues.read \
      -d ttl=3600 "http://$PROXY/oauth2/token" | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
    [ -n "$TOKEN" ] || { echo "no token" >&2; exit 1; }
    URLPATH=/github$PATH_Q
    ;;
  bare)
    RUST_LOG=warn taskset -c 1 "${VG[@]}" "$BIN" "$PROXY" "$UP" "$CREDENTIAL" 2>"$OUT/proxy.log" &
    VGPID=$!
    wait_up "$PROXY" 120
    TOKEN=-
    URLPATH=$PATH_Q
    ;;
  *) echo "KIND is credbroker or bare" >&2; exit 2 ;;
esac

# --- the fixed-count load: warm-up, zero, N calls, dump ---
taskset -c 0 python3 "$HERE/client.py" "$PROXY" "$URLPATH" "$TOKEN" "$CONNS" "$WARM" "$N" \
  "callgrind_control -z $VGPID >/dev/null" "callgrind_control -d $VGPID >/dev/null" | tee "$OUT/client.txt"
sleep 1
DUMP=$(ls "$OUT"/callgrind.out.$VGPID.* 2>/dev/null | head -1)
[ -n "$DUMP" ] || { echo "no dump from callgrind_control -d" >&2; exit 1; }
kill "$VGPID"; wait "$VGPID" 2>/dev/null || true; VGPID=""
mv "$DUMP" "$OUT/measured.cg"
[ "$KIND" = credbroker ] && tail -n 4 "$WORK/audit.jsonl" > "$OUT/audit_tail.jsonl" 2>/dev/null || true
rm -f "$OUT"/callgrind.out.*   # the final dump on exit: shutdown only

# --- reports ---
callgrind_annotate --threshold=100 "$OUT/measured.cg" > "$OUT/annotate_self.txt" 2>/dev/null || true
callgrind_annotate --threshold=100 --inclusive=yes "$OUT/measured.cg" > "$OUT/annotate_incl.txt" 2>/dev/null || true
python3 "$HERE/analyse.py" "$OUT/measured.cg" "$N" > "$OUT/report.txt"
head -60 "$OUT/report.txt"
echo "full report: $OUT/report.txt"
