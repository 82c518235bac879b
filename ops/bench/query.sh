#!/usr/bin/env bash
# Query latency with a corpus of 10,000 chunks: builds the index once with
# `ragd ingest` (also the ingest-throughput figure), then starts the daemon
# and runs ops/bench/query.py with 1 and 8 clients.
#
#   RERANKER=DIR        a cross-encoder folder for [reranker] (RERANKER=minilm
#                       builds one of ms-marco-MiniLM-L-6-v2's architecture
#                       from all-MiniLM-L6-v2's encoder and a random head:
#                       the real cost, not real scores)
#   BUDGET_MS=200       [query] latency_budget_ms
#   NOTES=10000         corpus size;  CLIENTS="1 8"  client counts
#   N=300  ONLY=miss|hit  questions per run;  RAGD_BIN=PATH  skip the build
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
profile="${PROFILE:-release}"
./ops/fetch-models.sh
# OpenBLAS for the CPU model's GEMMs, as ops/run.sh uses it (RAGD_BLAS=off
# measures the gemm crate fallback).
RAGD_BLAS="${RAGD_BLAS:-$(./ops/fetch-blas.sh)}"
export RAGD_BLAS
if [ -n "${RAGD_BIN:-}" ]; then bin="$RAGD_BIN"   # e.g. the dev-profile binary `cargo test` built
elif [ "$profile" = release ]; then cargo build --release --bin ragd; bin="$CARGO_TARGET_DIR/release/ragd"; else cargo build --bin ragd; bin="$CARGO_TARGET_DIR/debug/ragd"; fi
work="${BENCH_DIR:-$HOME/.cache/ragd/bench-query}"
notes="${NOTES:-10000}"
work="$work-$notes"
mkdir -p "$work/kb/notes"
reranker="${RERANKER:-}"
if [ "$reranker" = minilm ]; then
  reranker="$HOME/.cache/ragd/minilm-cross-encoder"
  [ -f "$reranker/model.safetensors" ] || "$(./ops/bench/numpy-python.sh)" ops/bench/make_cross_encoder.py models/all-MiniLM-L6-v2 "$reranker"
fi
if [ ! -f "$work/kb/notes/note-$(printf %05d $((notes - 1))).txt" ]; then
  python3 - "$work/kb/notes" "$notes" <<'PY'
import sys
topics = ["meeting room", "parental leave", "travel budget", "expense receipt", "on-call rotation",
          "build cache", "office hours", "salary review", "incident channel", "team booking"]
for i in range(int(sys.argv[2])):
    t = topics[i % len(topics)]
    open(f"{sys.argv[1]}/note-{i:05}.txt", "w").write(f"Note {i} about the {t}: team {i % 97} owns it and answers within {i % 48} hours.")
PY
fi
cat > "$work/ragd.toml" <<TOML
data_dir = "data"
[model]
embedder = "$PWD/models/all-MiniLM-L6-v2"
[reranker]
model = "$reranker"
[query]
bind = "127.0.0.1:18480"
${BUDGET_MS:+latency_budget_ms = $BUDGET_MS}
[admin]
bind = "127.0.0.1:18481"
[[sources]]
name = "kb"
path = "kb"
division = "general"
access_level = "public"
[[principals]]
name = "bench"
token = "bench-token-123"
divisions = ["general"]
access_levels = ["public"]
TOML
/usr/bin/time -v "$bin" ingest --config "$work/ragd.toml" 2> "$work/ingest.time" | tail -1
grep -E "Maximum resident|Elapsed" "$work/ingest.time"
RAGD_LOG=warn "$bin" up --config "$work/ragd.toml" &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
until curl -sf http://127.0.0.1:18481/ready >/dev/null; do sleep 0.5; done
curl -s http://127.0.0.1:18481/index; echo
for c in ${CLIENTS:-1 8}; do
  python3 ops/bench/query.py http://127.0.0.1:18480 bench-token-123 --n "${N:-300}" --clients "$c" ${ONLY:+--only $ONLY}
done
