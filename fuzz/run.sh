#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: `fuzz/run.sh SECONDS [TARGET…]` (default 60 s,
# all targets). Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain; without
# nightly it falls back to the stable toolchain with RUSTC_BOOTSTRAP=1 (libFuzzer needs the
# unstable -Zsanitizer flags). Corpora start from fuzz/seeds and grow in fuzz/corpus; crashes
# land in fuzz/artifacts/TARGET. Exits non-zero if any target found a crash.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(canonical pattern token config)

if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

"${fuzz[@]}" build --dev
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
  echo "== $t: ${secs}s"
  if ! "${fuzz[@]}" run --dev "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 \
      2>"$t.log"; then
    echo "!! $t found a crash: see fuzz/artifacts/$t and fuzz/$t.log"
    status=1
  fi
  grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|Done )' "$t.log" || tail -n 3 "$t.log"
done
exit $status
