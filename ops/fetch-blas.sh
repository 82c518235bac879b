#!/usr/bin/env bash
# Installs OpenBLAS for the CPU model's GEMMs and prints the library's path;
# export it as RAGD_BLAS. ragd loads it at run time and runs without it (on
# the gemm crate, ~1.6x slower on chunk batches: BENCHMARKS.md), so this is
# an accelerator, not a build dependency.
#
# The library comes from PyPI like the model: scipy-openblas32 is OpenBLAS
# as NumPy and SciPy ship it, one self-contained .so (libc, libm and pthread
# only; symbols prefixed scipy_, which ragd looks for too). No Python is
# needed at run time: we only download and unzip the wheel. A system
# OpenBLAS (Debian's libopenblas0) works as well: ragd tries
# libopenblas.so.0 when RAGD_BLAS is unset.
set -euo pipefail
version=0.3.34.481.3
dest="${XDG_CACHE_HOME:-$HOME/.cache}/ragd/openblas-$version"
lib="$dest/scipy_openblas32/lib/libscipy_openblas.so"
if [ ! -f "$lib" ]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/ragd/wheels"
  mkdir -p "$cache"
  wheel=$(ls "$cache"/scipy_openblas32-"$version"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$cache" \
      "scipy-openblas32==$version" >&2
    wheel=$(ls "$cache"/scipy_openblas32-"$version"-*.whl | head -1)
  fi
  tmp=$(mktemp -d "${dest}.XXXX")
  python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("scipy_openblas32/lib/")])
PY
  rm -rf "$dest"
  mv "$tmp" "$dest"   # whole or not at all: a half-unzipped library never loads
fi
echo "$lib"
