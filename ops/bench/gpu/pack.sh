#!/usr/bin/env bash
# Packs what ops/bench/gpu/run.sh needs on a GPU machine into .gpu/ (ignored
# by git): the parity tests and the embedding bench built with the cuda
# feature (stripped, xz), and data.tar.xz: the model with its weights in
# f16, and the fixtures.
#
# Why f16 weights: the device tool carries at most 64 MiB and the f32
# all-MiniLM-L6-v2 is 87 MiB. run.sh turns them back into an f32 model and
# re-records the f32 reference from sentence-transformers with those very
# weights, so ragd f32, ragd f16 and PyTorch all compare on one model.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragd-target}"
./ops/fetch-models.sh
fixtures="${RAGD_FIXTURES:-../shared/fixtures}"
out=.gpu
rm -rf "$out"
mkdir -p "$out/model/1_Pooling" "$out/fixtures"

exe() { # the executable a cargo --no-run build with --message-format=json made
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m.get("target", {}).get("name") == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}
# One build, the test profile (every crate with model code is at opt-level 3
# there): the parity tests (tests/gpu.rs) and the embedding bench.
cargo test --features cuda --test gpu --bench embed --no-run --message-format=json >"$out/build.json"
parity=$(exe gpu <"$out/build.json")
embed=$(exe embed <"$out/build.json")
rm "$out/build.json"
for pair in "parity:$parity" "embed:$embed"; do
  name=${pair%%:*} path=${pair#*:}
  strip -o "$out/$name" "$path"
  xz -T2 -6 "$out/$name"
done

m=models/all-MiniLM-L6-v2
"$(./ops/bench/numpy-python.sh)" ops/bench/safetensors_np.py "$m/model.safetensors" "$out/model/model.safetensors" f16
cp "$m"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt,modules.json,sentence_bert_config.json,config_sentence_transformers.json} "$out/model/"
cp "$m/1_Pooling/config.json" "$out/model/1_Pooling/"
cp "$fixtures/minilm-l6-v2-reference.jsonl" "$out/fixtures/"
cp -r "$fixtures/tiny-cross-encoder" "$out/fixtures/"
# xz takes the f16 weights from 45 to 41 MB: the trip's limit is tight.
tar -C "$out" -cf - model fixtures | xz -T2 -6 >"$out/data.tar.xz"
rm -rf "$out/model" "$out/fixtures"
du -sb "$out"/*
