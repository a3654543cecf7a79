#!/usr/bin/env bash
# The benchmark in one command (see README.md, "Benchmarks"):
#
#   ./scripts/bench.sh                      # every row, about 3 minutes once built
#   ./scripts/bench.sh --quick              # smaller backlogs, shorter phases: checks it works
#   ./scripts/bench.sh --only 2,read        # some rows: 1 throughput, 2 latency, 3 snapshot,
#                                           #   4 apply, 5 read, 6 memory
#   ./scripts/bench.sh --results DIR        # where the JSON and the chart go (bench/results)
#
# 1. Finds Postgres (initdb/postgres, psql, pg_recvlogical), nats-server and the DejaVu font of
#    the latency chart; installs the Debian packages when they are missing and this runs as
#    root (else says what to install).
# 2. Builds the release binaries (`cargo build --release --locked`): cdc, view-agent, cdc-bench.
# 3. Runs cdc-bench, which starts private Postgres and NATS servers per row (free ports, temp
#    dirs under this script's own temp dir; never the machine's 5432/4222), prints one markdown
#    table and writes bench/results/cdc-bench-<time>.json, …-latency.png and latest.*.
# 4. Removes its temp dir at the end, on an error and on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done

say() { printf '\033[1m%s\033[0m\n' "$*" >&2; }

# --- 1. prerequisites -------------------------------------------------------------------------
have_pg_bin() { command -v "$1" >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1; }
missing=()
have_pg_bin initdb || missing+=(postgresql)
have_pg_bin pg_recvlogical && have_pg_bin psql || missing+=(postgresql-client)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if ! command -v cargo >/dev/null 2>&1; then
  echo "bench: cargo not found: install the Rust toolchain (https://rustup.rs) and run again" >&2
  exit 1
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: missing ${missing[*]}: install with 'sudo apt-get install ${missing[*]}' and run again" >&2
    exit 1
  fi
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "bench: running as root, but there is no 'postgres' OS user to run the server as: install the Debian package postgresql" >&2
  exit 1
fi

# --- 2. build ---------------------------------------------------------------------------------
say "building cdc, view-agent and cdc-bench (release)"
cargo build --release --locked -p cdc -p consumers -p cdc-bench --bins

# --- 3. run, 4. clean up -----------------------------------------------------------------------
work_dir="$(mktemp -d "${TMPDIR:-/tmp}/cdc-bench.XXXXXX")"
# Traversable by the `postgres` OS user, whose clusters live inside.
chmod 755 "$work_dir"
trap 'rm -rf "$work_dir"' EXIT
say "running cdc-bench (temp dir $work_dir)"
# cdc-bench stops the servers it started when a row ends, fails or is interrupted (Ctrl-C).
TMPDIR="$work_dir" target/release/cdc-bench "$@"
