#!/usr/bin/env bash
# Fetches the model, builds ragd and runs it on config/default.toml, which
# watches examples/corpus and serves queries on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
source ops/need.sh
need cargo cc c++ make python3 pip
./ops/fetch-models.sh
# OpenBLAS for the model's GEMMs; ragd runs without it, only slower.
RAGD_BLAS="${RAGD_BLAS:-$(./ops/fetch-blas.sh || echo off)}"
export RAGD_BLAS
cargo build --release --bin ragd
exec "$CARGO_TARGET_DIR/release/ragd" up --config "${1:-config/default.toml}"
