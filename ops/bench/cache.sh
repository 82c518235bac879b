#!/usr/bin/env bash
# Cache-hit latency and throughput, embedded cache vs Redis (Valkey with the
# search module), on the 10k-chunk index that ops/bench/query.sh builds
# (run that first). 1 client, then 200 concurrent clients, same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
profile="${PROFILE:-release}"
if [ -n "${RAGD_BIN:-}" ]; then bin="$RAGD_BIN"   # an already built ragd
elif [ "$profile" = release ]; then cargo build --release --bin ragd; bin="$CARGO_TARGET_DIR/release/ragd"
else cargo build --bin ragd; bin="$CARGO_TARGET_DIR/debug/ragd"; fi
work="${BENCH_DIR:-$HOME/.cache/ragd/bench-query}"
[ -f "$work/ragd.toml" ] || { echo "run ops/bench/query.sh first (it builds the index)" >&2; exit 2; }
source ops/services.sh
port=18490
vpid=$(valkey_start "$port")
trap 'kill $vpid 2>/dev/null; [ -n "${pid:-}" ] && kill $pid 2>/dev/null' EXIT
for backend in embedded redis; do
  RAGD_CACHE__BACKEND=$backend RAGD_CACHE__REDIS_URL="redis://127.0.0.1:$port/" RAGD_LOG=warn \
    "$bin" up --config "$work/ragd.toml" &
  pid=$!
  until curl -sf http://127.0.0.1:18481/ready >/dev/null; do sleep 0.5; done
  for clients in 1 200; do
    n=$(( clients == 1 ? 300 : 2000 ))
    python3 ops/bench/query.py http://127.0.0.1:18480 bench-token-123 --n "$n" --clients "$clients" --only hit |
      sed "s/^{/{\"cache\": \"$backend\", /"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pid=
done
