#!/usr/bin/env bash
# Fetches the model, builds ragd and runs it on config/default.toml, which
# watches examples/corpus and serves queries on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
./ops/fetch-models.sh
cargo build --release --bin ragd
exec "$CARGO_TARGET_DIR/release/ragd" up --config "${1:-config/default.toml}"
