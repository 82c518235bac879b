#!/usr/bin/env bash
# On a GPU machine (the device tool), after ops/bench/gpu/pack.sh here:
# parity of ragd's burn-cuda model (f32 and f16, additive-bias and flash
# attention) and embedding throughput against sentence-transformers on the
# same GPU, same model, same texts. Logs and JSON lines go to $OUT (or
# ./gpu-out); the last lines printed are the table for BENCHMARKS.md.
#
#   ATTENTION="bias flash"     parity runs (RAGD_GPU_ATTENTION)
#   PARITY_FILTER=cuda::embedder   (each test runs in a process of its own)
#   VARIANTS="cuda-f16:flash cuda-f16:bias cuda:flash"   bench runs
#   STEP_TIMEOUT=120  SCALE=4  DEBUG=1
set -uo pipefail
cd "$(dirname "$0")/../../.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
work=/tmp/ragd-gpu
rm -rf "$work" && mkdir -p "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, sentence_transformers as s; print("torch", torch.__version__, "sentence-transformers", s.__version__)' | tee -a "$out/gpu.txt"

# cudarc loads the driver and NVRTC at run time: point it at NVRTC.
nvrtc=$(find /usr/local/cuda*/ /usr/lib /opt "$(python3 -c 'import site; print(site.getsitepackages()[0])')"/nvidia \
  -name 'libnvrtc.so*' 2>/dev/null | grep -v builtins | head -1)
echo "nvrtc: $nvrtc" | tee -a "$out/gpu.txt"
export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for b in parity embed; do
  python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' .gpu/$b.xz "$work/$b"
  chmod +x "$work/$b"
done

python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/data.tar.xz "$work/carried"
python3 ops/bench/gpu/prep.py "$work/carried" "$work/model" "$work/fixtures" 2>&1 | grep -v Warning | tee "$out/prep.log"
python3 ops/bench/make_cross_encoder.py "$work/model" "$work/ce" | tee -a "$out/prep.log"
export RAGD_MODEL="$work/model" RAGD_FIXTURES="$work/fixtures" RAGD_BENCH_MODEL="$work/model" RAGD_BENCH_RERANK="$work/ce"

# Autotune benchmarks every candidate kernel for each new shape key; at the
# default level a first run spent minutes there (every fixture text is a new
# shape). Minimal keeps the first pick: timings below are at that level.
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
# One kernel cache for every step (what a GPU node gets from data_dir/kernels,
# see model::use_kernel_cache): the parity runs compile (NVRTC) and tune, the
# benches load their picks. cubecl reads cubecl.toml from the working
# directory, so the ragd steps run in $work.
cat >"$work/cubecl.toml" <<TOML
[compilation]
cache = { file = "$work/kernels" }
[autotune]
cache = { file = "$work/kernels" }
TOML
# DEBUG=1: cubecl logs every kernel compilation and autotune to $out/cubecl.log
# (where the time goes when a step makes no progress).
[ -n "${DEBUG:-}" ] && export CUBECL_DEBUG_LOG="$out/cubecl.log"
step_timeout="${STEP_TIMEOUT:-120}"
scale="${SCALE:-4}"
stamp() { echo "[$(date +%T)] $*"; }

# The reference first, so a stuck ragd step still leaves it on record.
stamp "ST fp16"
timeout 90 python3 ops/bench/st_embed.py "$work/model" --device cuda --fp16 --scale "$scale" --rerank "$work/ce" 2>/dev/null | tee "$out/st-cuda-fp16.jsonl"
stamp "ST fp32"
timeout 90 python3 ops/bench/st_embed.py "$work/model" --device cuda --scale "$scale" --rerank "$work/ce" 2>/dev/null | tee "$out/st-cuda.jsonl"

for attn in ${ATTENTION:-bias flash}; do
  stamp "parity ($attn attention): ${PARITY_FILTER:-cuda::embedder}"
  (cd "$work" && RAGD_GPU_ATTENTION=$attn timeout "$step_timeout" "$work/parity" "${PARITY_FILTER:-cuda::embedder}" --test-threads=1 --nocapture 2>&1) \
    | tee "$out/parity-$attn.log" | grep -E "parity on|test |result|panicked|max abs|cosine"
done

for v in ${VARIANTS:-cuda-f16:flash cuda-f16:bias cuda:flash}; do
  backend=${v%%:*} attn=${v#*:}
  stamp "bench $backend, $attn attention, scale $scale"
  (cd "$work" && RAGD_GPU_ATTENTION=$attn RAGD_BENCH_BACKEND=$backend RAGD_BENCH_SCALE=$scale timeout "$step_timeout" "$work/embed") \
    2>"$out/bench-$backend-$attn.err" | sed "s/\"impl\":\"\([^\"]*\)\"/\"impl\":\"\1-$attn\"/" | tee "$out/ragd-$backend-$attn.jsonl"
done
stamp done
du -sh "$work/kernels" | tee -a "$out/gpu.txt"

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return {r["case"]: r for r in map(json.loads, open(p))} if os.path.exists(p) else {}
st32, st16 = load("st-cuda.jsonl"), load("st-cuda-fp16.jsonl")
cols = [("ragd f32 flash", load("ragd-cuda-flash.jsonl"), st32), ("ragd f16", load("ragd-cuda-f16-bias.jsonl"), st16),
        ("ragd f16 flash", load("ragd-cuda-f16-flash.jsonl"), st16)]
print("\n| case | ST fp32 tok/s | ST fp16 tok/s | " + " | ".join(f"{n} tok/s | ratio" for n, _, _ in cols) + " |")
print("|---" * (3 + 2 * len(cols)) + "|")
for case in ["short/b1", "short/b32", "short/b128", "chunk/b1", "chunk/b32", "chunk/b128"]:
    row = [case] + [f"{d[case]['tokens_per_s']:.0f}" if case in d else "–" for d in (st32, st16)]
    for _, d, ref in cols:
        if case in d and case in ref:
            row += [f"{d[case]['tokens_per_s']:.0f}", f"{d[case]['tokens_per_s'] / ref[case]['tokens_per_s']:.2f}×"]
        else:
            row += ["–", "–"]
    print("| " + " | ".join(row) + " |")
print("\n| rerank/q50 (50 pairs a question) | ST fp32 pairs/s | ST fp16 pairs/s | " + " | ".join(f"{n} pairs/s | ratio" for n, _, _ in cols) + " |")
print("|---" * (3 + 2 * len(cols)) + "|")
case = "rerank/q50"
row = [case] + [f"{d[case]['pairs_per_s']:.0f}" if case in d else "–" for d in (st32, st16)]
for _, d, ref in cols:
    ok = case in d and case in ref
    row += [f"{d[case]['pairs_per_s']:.0f}", f"{d[case]['pairs_per_s'] / ref[case]['pairs_per_s']:.2f}×"] if ok else ["–", "–"]
print("| " + " | ".join(row) + " |")
PY
