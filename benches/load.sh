#!/usr/bin/env bash
# Load comparison (issue 7): direct upstream vs nginx proxy_pass with an injected
# Authorization header vs credbroker (fsync=never and fsync=always), interleaved, each
# configuration repeated, wrk pinned to CPU 0 and the servers to CPU 1. Also the floor of
# credbroker's own stack: examples/bare_proxy.rs, hyper + tokio injecting the header and
# doing nothing else ("bare hyper proxy").
#
# usage: benches/load.sh [SECONDS_PER_RUN=10] [REPEATS=3]
# Prints a table and writes JSON to target/load.json. Installs wrk and nginx with apt when
# missing. Only loopback addresses are used; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
REPEATS="${2:-3}"
CONNS=(32 256)

source benches/common.sh
need_wrk_and_nginx
BIN=target/release/credbroker
[ -x "$BIN" ] || cargo build --release
BARE=target/release/examples/bare_proxy
[ -x "$BARE" ] || cargo build --release --example bare_proxy

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/px/nginx.pid" ] && kill "$(cat "$WORK/px/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

UP=127.0.0.1:18081; NGX=127.0.0.1:18082; CB_NEVER=127.0.0.1:18083; CB_ALWAYS=127.0.0.1:18084
BARE_AT=127.0.0.1:18085
CREDENTIAL="bench-credential-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"

upstream_and_nginx_proxy "$WORK" "$UP" "$NGX" "$CREDENTIAL"

secret=bench-client-secret
broker_conf "$WORK/never/credbroker.toml" "$CB_NEVER" never "$UP" "$CREDENTIAL" "$secret"
broker_conf "$WORK/always/credbroker.toml" "$CB_ALWAYS" always "$UP" "$CREDENTIAL" "$secret"
RUST_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/never/credbroker.toml" 2>"$WORK/never.log" & PIDS+=($!); PID_NEVER=$!
RUST_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/always/credbroker.toml" 2>"$WORK/always.log" & PIDS+=($!); PID_ALWAYS=$!
taskset -c 1 "$BARE" "$BARE_AT" "$UP" "$CREDENTIAL" 2>"$WORK/bare.log" & PIDS+=($!); PID_BARE=$!
for a in $UP $NGX $CB_NEVER $CB_ALWAYS $BARE_AT; do wait_http "$a"; done
TOK_NEVER=$(broker_token "$CB_NEVER" "$secret"); TOK_ALWAYS=$(broker_token "$CB_ALWAYS" "$secret")
PATH_Q=/repos/acme/widget/issues

pids_of() { # config name -> pids whose CPU counts as "the proxy"
  case "$1" in
    direct) cat "$WORK/up/nginx.pid"; pgrep -P "$(cat "$WORK/up/nginx.pid")" ;;
    nginx) cat "$WORK/px/nginx.pid"; pgrep -P "$(cat "$WORK/px/nginx.pid")" ;;
    bare) echo "$PID_BARE" ;;
    never) echo "$PID_NEVER" ;;
    always) echo "$PID_ALWAYS" ;;
  esac
}
cpu_ticks() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
peak_rss_kb() { local m=0; for p in $(pids_of "$1"); do v=$(awk '/VmHWM/{print $2}' "/proc/$p/status"); [ "$v" -gt "$m" ] && m=$v; done; echo $m; }
TICK=$(getconf CLK_TCK)

run() { # name conns -> "rps p50_ms p99_ms cpu_us_per_req"
  local name=$1 c=$2 url hdr=()
  case $name in
    direct) url="http://$UP$PATH_Q"; hdr=(-H "Authorization: Bearer $CREDENTIAL") ;;
    nginx) url="http://$NGX$PATH_Q" ;;
    bare) url="http://$BARE_AT$PATH_Q" ;;
    never) url="http://$CB_NEVER/github$PATH_Q"; hdr=(-H "Authorization: Bearer $TOK_NEVER") ;;
    always) url="http://$CB_ALWAYS/github$PATH_Q"; hdr=(-H "Authorization: Bearer $TOK_ALWAYS") ;;
  esac
  local before after out
  before=$(cpu_ticks "$name")
  out=$(taskset -c 0 wrk -t1 -c"$c" -d"${DURATION}s" --latency "${hdr[@]}" "$url")
  after=$(cpu_ticks "$name")
  python3 - "$out" "$before" "$after" "$TICK" <<'PY'
import re, sys
out, before, after, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)); p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors = int(non2xx.group(1)) if non2xx else 0
cpu_us = (after - before) / tick * 1e6 / max(total, 1)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {cpu_us:.1f} {errors}")
PY
}

echo "load comparison: ${DURATION}s per run, ${REPEATS} repeats, interleaved; wrk on CPU 0, servers on CPU 1" >&2
RESULTS="$WORK/results.txt"; : > "$RESULTS"
for c in "${CONNS[@]}"; do
  for r in $(seq "$REPEATS"); do
    for name in direct nginx bare never always; do
      line=$(run "$name" "$c")
      echo "$c $name $r $line" | tee -a "$RESULTS" >&2
    done
  done
done
for name in direct nginx bare never always; do echo "rss $name $(peak_rss_kb "$name")" >> "$RESULTS"; done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
rss = {r[1]: int(r[2]) for r in rows if r[0] == "rss"}
data = {}
for r in rows:
    if r[0] == "rss": continue
    c, name = int(r[0]), r[1]
    data.setdefault((c, name), []).append(tuple(map(float, r[3:8])))
out = {"runs": {}, "ratios": {}, "peak_rss_kb": rss}
names = {"direct": "direct upstream", "nginx": "nginx proxy_pass", "bare": "bare hyper proxy", "never": "credbroker fsync=never", "always": "credbroker fsync=always"}
print(f"{'conns':>5}  {'configuration':<24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} {'non-2xx':>8}")
for (c, name), vals in sorted(data.items(), key=lambda kv: (kv[0][0], list(names).index(kv[0][1]))):
    med = [statistics.median(v[i] for v in vals) for i in range(5)]
    out["runs"][f"{c}/{name}"] = dict(zip(["rps", "p50_ms", "p99_ms", "cpu_us_per_req", "non_2xx"], med), repeats=len(vals))
    print(f"{c:>5}  {names[name]:<24} {med[0]:>9.0f} {med[1]:>8.3f} {med[2]:>8.3f} {med[3]:>10.1f} {med[4]:>8.0f}")
for c in sorted({k[0] for k in data}):
    g = lambda n, k: out["runs"][f"{c}/{n}"][k]
    for n in ("bare", "never", "always"):
        out["ratios"][f"{c}/{n}"] = {
            "rps_vs_nginx": g(n, "rps") / g("nginx", "rps"),
            "rps_vs_direct": g(n, "rps") / g("direct", "rps"),
            "cpu_vs_nginx": g(n, "cpu_us_per_req") / g("nginx", "cpu_us_per_req"),
            "p99_added_over_direct_ms": g(n, "p99_ms") - g("direct", "p99_ms"),
        }
        if n != "bare":
            # What credbroker's own work costs over the stack it is built on.
            out["ratios"][f"{c}/{n}"]["rps_vs_bare"] = g(n, "rps") / g("bare", "rps")
            out["ratios"][f"{c}/{n}"]["cpu_vs_bare"] = g(n, "cpu_us_per_req") / g("bare", "cpu_us_per_req")
print()
for k, v in out["ratios"].items():
    bare = f"; vs bare hyper: req/s {v['rps_vs_bare']:.2f}x, CPU/req {v['cpu_vs_bare']:.2f}x" if "rps_vs_bare" in v else ""
    print(f"{k:<12} req/s vs nginx {v['rps_vs_nginx']:.2f}x, vs direct {v['rps_vs_direct']:.2f}x; CPU/req vs nginx {v['cpu_vs_nginx']:.2f}x; p99 added over direct {v['p99_added_over_direct_ms']:.3f} ms{bare}")
print("peak RSS (KiB):", rss)
json.dump(out, open("target/load.json", "w"), indent=2)
print("JSON: target/load.json")
PY
