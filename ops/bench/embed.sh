#!/usr/bin/env bash
# Embedding throughput, ragd vs sentence-transformers, same machine, same run.
# Installs sentence-transformers (and PyTorch) in a venv under ~/.cache/ragd
# the first time. Prints both result sets and the ratio table.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
./ops/fetch-models.sh
# OpenBLAS for the CPU model's GEMMs, as ops/run.sh uses it (RAGD_BLAS=off
# measures the gemm crate fallback).
RAGD_BLAS="${RAGD_BLAS:-$(./ops/fetch-blas.sh)}"
export RAGD_BLAS
venv="${XDG_CACHE_HOME:-$HOME/.cache}/ragd/bench-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sentence_transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet sentence-transformers
fi
out=$(mktemp -d)
cargo bench --bench embed 2>/dev/null | tee "$out/ragd.jsonl"
# BACKENDS=ndarray also measures burn ndarray on the system OpenBLAS
# (needs Debian's libopenblas-dev), the CPU backend flex was chosen over.
if [[ " ${BACKENDS:-} " == *" ndarray "* ]]; then
  RAGD_BENCH_BACKEND=ndarray cargo bench --features ndarray --bench embed 2>/dev/null | tee "$out/ndarray.jsonl"
fi
"$venv/bin/python" ops/bench/st_embed.py models/all-MiniLM-L6-v2 | tee "$out/st.jsonl"
python3 - "$out/ragd.jsonl" "$out/st.jsonl" <<'PY'
import json, sys
ragd = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
import os
nd_path = os.path.join(os.path.dirname(sys.argv[1]), "ndarray.jsonl")
nd = {r["case"]: r for r in map(json.loads, open(nd_path))} if os.path.exists(nd_path) else {}
st = {r["case"]: r for r in map(json.loads, open(sys.argv[2]))}
print("\n| case | sentence-transformers tokens/s | ragd flex tokens/s | ratio | ragd ndarray+OpenBLAS tokens/s | ratio |")
print("|---|---|---|---|---|---|")
for case, r in ragd.items():
    s = st.get(case)
    if s:
        n = nd.get(case)
        extra = f"{n['tokens_per_s']:.0f} | {n['tokens_per_s']/s['tokens_per_s']:.2f}×" if n else "– | –"
        print(f"| {case} | {s['tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s']/s['tokens_per_s']:.2f}× | {extra} |")
PY
